"""Stop training at the first non-finite loss, before it reaches the weights.

The check runs in ``on_before_backward``: the NaN/inf loss is never back-propagated, so the
weights stay those of the last good step, and the last checkpoint on disk (written atomically)
is the last good one. The error names the epoch, the global step, the batch index and, when
the batch came from an :class:`~medmetric.datamodules.base.ImageDataset`, the image ids in it (found by
replaying the loader's deterministic batch sampler for this epoch).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def batch_image_ids(trainer: L.Trainer, batch_idx: int, limit: int = 16) -> list[str] | None:
    """Ids (file stems) of the images of training batch ``batch_idx`` of this epoch, if knowable."""
    try:
        loader = trainer.train_dataloader
        dataset = loader.dataset
        indices = next(itertools.islice(iter(loader.batch_sampler), batch_idx, None))
        return [Path(dataset.paths[i]).stem for i in list(indices)[:limit]]
    except Exception:  # another dataset type or sampler: the step and batch ids still identify it
        return None


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` when the training loss is not finite."""

    def __init__(self):
        self.batch_idx = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        # every rank decides together, so under DDP no rank waits forever on one that stopped
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        ids = batch_image_ids(trainer, self.batch_idx)
        images = f", images {ids}" if ids else ""
        value = loss.detach().float().cpu().flatten()[0].item()
        raise NonFiniteLossError(
            f"training loss is {value} (rank {trainer.global_rank}) at epoch {trainer.current_epoch}, "
            f"global step {trainer.global_step}, batch {self.batch_idx}{images}; training stopped before "
            "this step changed the weights, the last checkpoint is the last good one "
            f"({Path(trainer.default_root_dir) / 'checkpoints'}). Lower model.lr, check those images, or "
            "use a loss that is stable on this data"
        )
