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
from lightning.pytorch.callbacks import Callback
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
        trainer.save_checkpoint(path)
        checkpoint.last_model_path = str(path)
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: saved %s at epoch %d, step %d; continue with --ckpt_path last",
                path, trainer.current_epoch, trainer.global_step,
            )
