"""A callback for DDP tests: each rank writes the class ids of every training batch it saw."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class BatchRecorder(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[1].tolist())

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.batches}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
