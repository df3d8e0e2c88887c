"""Stage 2: re-balance the classifier on a frozen stage-1 backbone (Kang et al., ICLR 2020).

cRT (classifier re-training): the backbone from the stage-1 handoff is frozen and kept in eval
mode (BatchNorm statistics untouched), a freshly initialised linear head is trained, and the
DataModule feeds class-balanced batches (``data.sampler=class_balanced``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.handoff import check_manifest, read_manifest
from lightning_modules.backbones import create_backbone, load_backbone_weights
from lightning_modules.classifier_base import ClassifierModule
from lightning_modules.heads import LinearHead

STRATEGIES = ("crt",)


class RebalancedHeadModule(ClassifierModule):
    """Frozen stage-1 backbone + a re-trained head.

    Args:
        class_names: must equal the stage-1 class list (checked against the manifest).
        handoff: path of the stage-1 ``handoff.json``; the CLI fills in
            ``runs/<experiment>/handoff.json`` when it is not given.
        strategy: head strategy; ``crt``.
        backbone: optional, only to assert the expected stage-1 backbone name.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        handoff: str | None = None,
        strategy: str = "crt",
        backbone: str | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
    ):
        super().__init__(class_names)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown stage-2 strategy {strategy!r} (model.strategy); valid: {list(STRATEGIES)}")
        if not handoff:
            raise ValueError(
                "model.handoff is not set: pass --experiment=<stage-1 experiment> (the CLI then reads "
                "runs/<experiment>/handoff.json) or --model.handoff=<path to handoff.json>"
            )
        self.save_hyperparameters()
        self.manifest = read_manifest(handoff)
        check_manifest(self.manifest, class_names=self.class_names, backbone=backbone)
        config = self.manifest["backbone"]
        self.backbone, self.feature_dim = create_backbone(config["name"], config["in_chans"], **config["kwargs"])
        load_backbone_weights(self.backbone, self.manifest["backbone_weights"])
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head = LinearHead(self.feature_dim, self.num_classes)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "split_sha256"):
            check_manifest(self.manifest, class_names=datamodule.class_names, split_sha256=datamodule.split_sha256())

    def train(self, mode: bool = True):
        """Lightning calls ``train()`` every epoch; the frozen backbone must stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        loss = F.cross_entropy(self(images), targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return self.make_optimizer(self.head.parameters(), hp.optimizer, hp.lr, hp.weight_decay)
