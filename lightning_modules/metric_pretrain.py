"""Stage 1: a timm backbone trained with cross-entropy plus lambda x a metric loss.

    loss = CE(head(f(x)), y) + metric_weight * metric_loss(normalize(projector(f(x))), y)

``metric_weight=0`` is the one-stage CE baseline. ``metric_only=True`` keeps the metric loss
alone for the backbone; the head then trains on detached features (a linear probe), so its
validation balanced accuracy can still pick the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.backbones import create_backbone
from lightning_modules.classifier_base import ClassifierModule
from lightning_modules.heads import LinearHead, Projector
from lightning_modules.losses import build_metric_loss


class MetricPretrainModule(ClassifierModule):
    """Backbone + linear classifier + embedding projector (stage 1 of the two-stage recipe)."""

    def __init__(
        self,
        class_names: Sequence[str],
        backbone: str = "resnet18",
        in_chans: int = 3,
        pretrained_path: str | None = None,
        backbone_kwargs: dict | None = None,
        embedding_dim: int = 128,
        metric_loss: str = "supcon",
        metric_loss_kwargs: dict | None = None,
        metric_weight: float = 1.0,
        metric_only: bool = False,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ):
        super().__init__(class_names)
        if metric_weight < 0:
            raise ValueError(f"model.metric_weight must be >= 0, got {metric_weight}")
        if metric_only and metric_weight == 0:
            raise ValueError("model.metric_only=true needs model.metric_weight > 0 (nothing would train the backbone)")
        self.save_hyperparameters()
        self.backbone, self.feature_dim = create_backbone(
            backbone, in_chans=in_chans, pretrained_path=pretrained_path, **(backbone_kwargs or {})
        )
        self.head = LinearHead(self.feature_dim, self.num_classes)
        self.projector = Projector(self.feature_dim, embedding_dim)
        self.metric_loss = build_metric_loss(metric_loss, **(metric_loss_kwargs or {}))

    def backbone_config(self) -> dict:
        """What stage 2 needs to rebuild the same backbone (weights come from the checkpoint)."""
        hp = self.hparams
        return {"name": hp.backbone, "in_chans": hp.in_chans, "kwargs": dict(hp.backbone_kwargs or {})}

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        features = self.backbone(images)
        hp = self.hparams
        head_input = features.detach() if hp.metric_only else features
        ce = F.cross_entropy(self.head(head_input), targets)
        loss = ce
        logs = {"train/ce": ce}
        if hp.metric_weight > 0:
            metric = self.metric_loss(self.projector(features), targets)
            loss = ce + hp.metric_weight * metric  # with metric_only, ce reaches the head only
            logs["train/metric"] = metric
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return self.make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.weight_decay)
