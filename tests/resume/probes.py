"""Callbacks for the resume tests, run inside CLI subprocesses.

``StepLog`` appends one JSON line per training batch (epoch, global step, batch index, targets,
SHA-256 of the image tensor's bytes: the augmented pixels) and flushes it at once, so a run killed with SIGKILL still leaves what it trained on.
``SignalAt`` sends a signal to its own process at the start of one training batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepLog(Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "batch_idx": batch_idx, "targets": batch[1].tolist(),
                  "images_sha256": hashlib.sha256(batch[0].detach().cpu().contiguous().numpy().tobytes()).hexdigest()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class SignalAt(Callback):
    def __init__(self, epoch: int, batch: int, signal_name: str):
        self.epoch, self.batch, self.signal = epoch, batch, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signal)



class KillDataWorkerAt(Callback):
    """SIGKILL one DataLoader worker process (as the OOM killer would) at one training batch."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import multiprocessing

        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            workers = multiprocessing.active_children()
            assert workers, "no DataLoader worker to kill: run with data.num_workers >= 1"
            os.kill(workers[0].pid, signal.SIGKILL)
