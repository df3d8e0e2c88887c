"""Stage 1 / one-stage baseline for multi-label chest X-rays: timm backbone + linear head,
trained with a multi-label loss (lightning_modules/losses/multilabel.py).

    scores = head(backbone(x)),   loss = MULTILABEL_LOSSES[loss](scores[:, seen], y[:, seen])

In GZSL mode the unseen labels' columns are left out of the loss (their targets are zero in
training anyway); a linear head cannot score an unseen label, so its unseen AUROC is the
reference a cross-modal model has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from medmetric.datamodules.contracts import MULTILABEL_FIX, MultiLabelData, require
from medmetric.lightning_modules.backbones import create_backbone
from medmetric.lightning_modules.heads import LinearHead
from medmetric.lightning_modules.losses.multilabel import MULTILABEL_LOSSES, build_multilabel_loss
from medmetric.lightning_modules.multilabel import MultiLabelClassifierModule
from medmetric.lightning_modules.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    check_optimization_args,
)


def loss_from_datamodule(module: MultiLabelClassifierModule, name: str, kwargs: dict | None):
    """Build the named loss from the DataModule's training counts, on the seen labels."""
    datamodule = require(
        module.trainer.datamodule, MultiLabelData, f"{type(module).__name__} (its multi-label loss)",
        fix=MULTILABEL_FIX,
    )
    counts = [datamodule.class_counts[i] for i in module.seen_idx]
    return build_multilabel_loss(name, counts, datamodule.num_train_images, **(kwargs or {}))


class SeenLabelLossTraining:
    """``training_step`` of a module whose scores train with ``self.loss`` (a multi-label loss
    built by :func:`loss_from_datamodule`) on the seen labels only."""

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        loss = self.loss(*self.restrict_to_seen(self(images), targets))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss


class MultiLabelPretrainModule(SeenLabelLossTraining, MultiLabelClassifierModule):
    """timm backbone + linear head + multi-label loss (the BCE baseline, or a re-balancing loss).

    Args:
        class_names: the labels, in column order (linked from ``data.class_names``).
        backbone: timm model name.
        in_chans: input channels (1 for grey X-rays without replication).
        pretrained_path: local weights file for the backbone (nothing is downloaded).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        loss: a name of ``MULTILABEL_LOSSES`` (``bce``, ``class_balanced_bce``, ``asymmetric``,
            ``logit_adjusted_bce``), built from the training counts.
        loss_kwargs: its arguments (``{pos_weight: true}`` for bce).
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

    stage: ClassVar[str] = "stage1"

    def __init__(
        self,
        class_names: Sequence[str],
        backbone: str = "resnet18",
        in_chans: int = 3,
        pretrained_path: str | None = None,
        backbone_kwargs: dict | None = None,
        loss: str = "bce",
        loss_kwargs: dict | None = None,
        optimizer: str | OptimizerFactory = "adamw",
        lr: float = 1e-3,
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
        self.save_hyperparameters()
        self._optimizer, self._lr_scheduler = optimizer, lr_scheduler
        self.backbone, self.feature_dim = create_backbone(
            backbone, in_chans=in_chans, pretrained_path=pretrained_path, **(backbone_kwargs or {})
        )
        self.head = LinearHead(self.feature_dim, self.num_classes)
        self.loss = None  # built in setup(): it needs the training counts

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.loss = loss_from_datamodule(self, self.hparams.loss, self.hparams.loss_kwargs)

    def backbone_config(self) -> dict:
        """What stage 2 needs to rebuild the same backbone (weights come from the checkpoint)."""
        hp = self.hparams
        return {"name": hp.backbone, "in_chans": hp.in_chans, "kwargs": dict(hp.backbone_kwargs or {})}

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def configure_optimizers(self):
        hp = self.hparams
        return self.make_optimizer(self.parameters(), self._optimizer, hp.lr, hp.weight_decay)
