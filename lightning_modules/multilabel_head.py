"""Stage 2 for multi-label data: a fresh linear head on a frozen stage-1 backbone, trained with
a (re-balancing) multi-label loss -- the multi-label analogue of cRT (Kang et al., ICLR 2020).

The backbone comes from a stage-1 handoff manifest (callbacks/handoff.py): from
MultiLabelPretrainModule or from the cross-modal module, which publish the same format
(backbone weights, backbone config, feature_dim). Only the backbone is reused; the stage-1
head or projector is not, so the stage-1 scoring rule does not matter. The backbone stays in
eval mode (BatchNorm statistics frozen). Re-balancing comes from the loss (``pos_weight``,
class-balanced, asymmetric, logit-adjusted), since class-aware samplers need one label per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from medmetric.datamodules.contracts import SplitIdentity, require
from medmetric.lightning_modules.backbones import create_backbone, load_backbone_weights
from medmetric.lightning_modules.heads import LinearHead
from medmetric.lightning_modules.losses.multilabel import MULTILABEL_LOSSES
from medmetric.lightning_modules.multilabel import MultiLabelClassifierModule
from medmetric.lightning_modules.multilabel_pretrain import (
    SeenLabelLossTraining,
    loss_from_datamodule,
)
from medmetric.lightning_modules.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    check_optimization_args,
)
from medmetric.run_io.manifest import check_manifest, read_manifest


class MultiLabelHeadModule(SeenLabelLossTraining, MultiLabelClassifierModule):
    """Frozen stage-1 backbone + new linear head + multi-label loss.

    Args:
        class_names: must equal the stage-1 label list (checked against the manifest).
        handoff: stage-1 ``handoff.json``; the CLI fills in ``runs/<experiment>/handoff.json``.
        loss: a name of ``MULTILABEL_LOSSES`` (``asymmetric``, ``bce``, ...).
        loss_kwargs: its arguments.
        backbone: optional, only to assert the expected stage-1 backbone name.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9), or a ``torch.optim`` class called with
            the parameters (``--model.optimizer=SGD --model.optimizer.nesterov=true``); ``lr``
            and ``weight_decay`` below always apply.
        lr: learning rate at ``base_batch_size`` images per step.
        weight_decay: weight decay.
        lr_scheduler: ``cosine`` (per step) or ``constant``, or a scheduler class called with the optimiser.
        warmup_steps: linear warm-up steps before the cosine (0: none).
        lr_scaling: scale ``lr`` with the global batch: ``none``, ``linear`` or ``sqrt``.
        base_batch_size: the global batch ``lr`` is tuned for (``lr_scaling``).
    """

    stage: ClassVar[str] = "stage2"

    def __init__(
        self,
        class_names: Sequence[str],
        handoff: str | None = None,
        loss: str = "asymmetric",
        loss_kwargs: dict | None = None,
        backbone: str | None = None,
        optimizer: str | OptimizerFactory = "adamw",
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        lr_scheduler: str | SchedulerFactory = "cosine",
        warmup_steps: int = 0,
        lr_scaling: str = "none",
        base_batch_size: int = 256,
    ):
        super().__init__(class_names)
        check_optimization_args(optimizer, lr_scheduler, warmup_steps)
        if loss not in MULTILABEL_LOSSES:
            raise ValueError(f"unknown multi-label loss {loss!r} (model.loss); valid: {sorted(MULTILABEL_LOSSES)}")
        if not handoff:
            raise ValueError(
                "model.handoff is not set: pass --experiment=<stage-1 experiment> (the CLI then reads "
                "runs/<experiment>/handoff.json) or --model.handoff=<path to handoff.json>"
            )
        self.save_hyperparameters()
        self._optimizer, self._lr_scheduler = optimizer, lr_scheduler
        self.manifest = read_manifest(handoff)
        check_manifest(self.manifest, class_names=self.class_names, backbone=backbone)
        config = self.manifest["backbone"]
        self.backbone, self.feature_dim = create_backbone(config["name"], config["in_chans"], **config["kwargs"])
        if self.feature_dim != self.manifest["feature_dim"]:
            raise ValueError(f"{self.manifest['path']}: feature_dim {self.manifest['feature_dim']} != rebuilt backbone's {self.feature_dim}")
        load_backbone_weights(self.backbone, self.manifest["backbone_weights"])
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head = LinearHead(self.feature_dim, self.num_classes)
        self.loss = None  # built in setup(): it needs the training counts

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = require(self.trainer.datamodule, SplitIdentity, "stage 2 (MultiLabelHeadModule: checks against the stage-1 manifest)")
        check_manifest(self.manifest, class_names=datamodule.class_names, split_sha256=datamodule.split_sha256())
        self.loss = loss_from_datamodule(self, self.hparams.loss, self.hparams.loss_kwargs)

    def train(self, mode: bool = True):
        """Lightning calls ``train()`` every epoch; the frozen backbone must stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def backbone_config(self) -> dict:
        return dict(self.manifest["backbone"])

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone(images)
        return self.head(features)

    def configure_optimizers(self):
        hp = self.hparams
        return self.make_optimizer(self.head.parameters(), self._optimizer, hp.lr, hp.weight_decay)
