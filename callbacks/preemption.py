"""Preemption and exact resume: RNG state in every checkpoint, a last.ckpt on SIGTERM.

Lightning 2.x already turns SIGTERM (what SLURM sends before preempting or at the time limit)
into a flag, shares it across DDP ranks, and raises ``SIGTERMException`` (a ``SystemExit`` with
status 0) after the current batch; ``ModelCheckpoint`` does not save on it by default. The
:class:`SaveOnPreemption` callback writes ``checkpoints/last.ckpt`` at that point, so a requeued
job continues with ``--ckpt_path last``.

:class:`RNGStateInCheckpoint` stores the python / numpy / torch (and CUDA) generator states, so a
run resumed from an end-of-epoch checkpoint draws the same random numbers as the uninterrupted
run (Lightning saves model, optimiser, scheduler, loop progress, and the samplers' plans are
seeded by (seed, epoch) already, but not the global generators).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def _numpy_state_plain(state: tuple) -> tuple:
    """numpy's legacy state with plain python types (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = state
    return (name, keys.tolist(), int(pos), int(has_gauss), float(cached))


class RNGStateInCheckpoint(Callback):
    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": _numpy_state_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class LastEveryEpochCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is refreshed after every validation (or training epoch).

    Since Lightning 2.5 ``save_last=True`` rewrites ``last.ckpt`` only when a top-k checkpoint was
    saved in the same step, so after an epoch that did not improve the monitored metric,
    ``last.ckpt`` would still hold an older epoch and a resumed run would silently retrain it.
    Saving here, after the parent's own logic, also records the updated best-so-far state.
    """

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SaveOnPreemption(Callback):
    """On SIGTERM, save ``last.ckpt`` in the run's checkpoint folder, then let Lightning exit (status 0)."""

    def __init__(self):
        self.saved_path: Path | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            log.warning("SIGTERM received but no checkpoint folder is configured; nothing saved")
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        checkpoint.last_model_path = str(path)  # before saving: it is part of the saved state, and a
        trainer.save_checkpoint(path)  # resumed ModelCheckpoint then rewrites last.ckpt, not last-v1.ckpt
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: saved %s at epoch %d, step %d; continue with --ckpt_path last",
                path, trainer.current_epoch, trainer.global_step,
            )
