"""Backbone features computed once per (backbone weights, transform, split) and reused.

Stage 2 with a frozen backbone and no augmentation sees the same features every epoch and
in every stage-2 run on the same backbone, so they are extracted once (rank zero; the other
ranks wait), saved atomically next to the stage-1 manifest (``<experiment>/feature_cache/``),
and the DataModule then serves feature vectors instead of images. The key hashes the backbone
weights, the eval transform and the split, so a different checkpoint or image size never
reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from medmetric.datamodules.splits import SPLITS
from medmetric.datamodules.transforms import build_transform
from medmetric.run_io.atomic import atomic_write

log = logging.getLogger(__name__)


def cache_key(backbone_sha256: str, image_size: int, split_sha256: str) -> str:
    description = {
        "backbone": backbone_sha256,
        "transform": repr(build_transform("none", image_size)),
        "split": split_sha256,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = backbone.to(device).eval()
    features, targets = [], []
    for images, labels in loader:
        features.append(backbone(images.to(device)).float().cpu())
        targets.append(labels)
    return torch.cat(features), torch.cat(targets)


class FeatureCache(Callback):
    """Turn a stage-2 fit on images into one on cached features (``model.feature_cache=true``)."""

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.path: Path | None = None
        self.reused: bool | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule.augment != "none":
            raise ValueError(
                f"model.feature_cache=true needs data.augment=none (got {datamodule.augment!r}): cached "
                "features cannot be augmented. Add --data.augment=none"
            )
        manifest = pl_module.manifest
        cache_dir = self.cache_dir or Path(manifest["path"]).parent / "feature_cache"
        key = cache_key(manifest["backbone_weights_sha256"], datamodule.image_size, datamodule.split_sha256())
        self.path = cache_dir / f"{key}.pt"
        self.reused = self.path.is_file()
        if trainer.is_global_zero and not self.reused:
            self._build(datamodule, pl_module.backbone, trainer.strategy.root_device)
        trainer.strategy.barrier("medmetric-feature-cache")
        cached = torch.load(self.path, map_location="cpu", weights_only=True)
        datamodule.use_features({split: (cached[split]["features"], cached[split]["targets"]) for split in SPLITS})
        log.info("%s feature cache %s", "reusing" if self.reused else "built", self.path)

    def _build(self, datamodule, backbone: torch.nn.Module, device: torch.device) -> None:
        payload = {}
        for split in SPLITS:
            features, targets = extract_features(backbone, datamodule.ordered_dataloader(split, sharded=False), device)
            payload[split] = {"features": features, "targets": targets}
        backbone.cpu()
        atomic_write(self.path, lambda handle: torch.save(payload, handle), what="feature cache")
