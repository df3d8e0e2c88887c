"""Lightning checkpoint IO with medmetric's atomic writes and ``weights_only=True`` loads.

``Trainer(plugins=[AtomicCheckpointIO()])`` (the CLI adds it) makes ModelCheckpoint's
``best-*.ckpt`` and ``last.ckpt`` crash-safe: see :mod:`medmetric.run_io.atomic`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medmetric.run_io.atomic import atomic_write, load_checkpoint_safely


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic saves, ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda handle: torch.save(checkpoint, handle), what="checkpoint")

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        map_location = map_location or (lambda storage, loc: storage)
        return load_checkpoint_safely(path, map_location=map_location)
