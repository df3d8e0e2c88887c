"""Stage 1: a timm backbone trained with cross-entropy plus lambda x a metric loss.

    loss = CE(head(f(x)), y) + metric_weight * metric_loss(normalize(projector(f(x))), y)

``metric_weight=0`` is the one-stage CE baseline; with ``head_loss`` (balanced_softmax, ldam with
deferred re-weighting, ce with class weights, ...) it is that one-stage re-balancing baseline. ``metric_only=True`` keeps the metric loss
alone for the backbone; the head then trains on detached features (a linear probe), so its
validation balanced accuracy can still pick the checkpoint.

Under DDP the metric loss sees the embeddings of all ranks (``gather_across_ranks``), with
gradients that match a single process holding the whole global batch (losses/distributed.py).
With ``class_weighting`` each term of the metric loss is weighted by its anchor's class weight
(inverse frequency or effective number of the training counts), so rare-class pairs count more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from medmetric.datamodules.contracts import TrainingCounts, require
from medmetric.lightning_modules.backbones import create_backbone
from medmetric.lightning_modules.classifier_base import ClassifierModule
from medmetric.lightning_modules.heads import LinearHead, Projector
from medmetric.lightning_modules.losses import (
    build_metric_loss,
    class_weights_from_counts,
)
from medmetric.lightning_modules.losses.base import MetricLossFactory
from medmetric.lightning_modules.losses.distributed import gather_across_ranks, world
from medmetric.lightning_modules.losses.rebalancing import (
    HEAD_LOSSES,
    HeadLossFactory,
    build_head_loss,
)
from medmetric.lightning_modules.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    check_optimization_args,
)


def is_plain_ce(head_loss, kwargs: dict | None) -> bool:
    """The default head loss: plain ``F.cross_entropy`` (bit-identical to before), no object."""
    return isinstance(head_loss, str) and head_loss == "ce" and not kwargs


class MetricPretrainModule(ClassifierModule):
    """Backbone + linear classifier + embedding projector (stage 1 of the two-stage recipe).

    The components are typed factories, not strings with dicts: a short name
    (``--model.metric_loss=supcon``) or a class with its own arguments
    (``--model.metric_loss=SupCon --model.metric_loss.temperature=0.05``, or
    ``class_path``/``init_args``). The module calls the factory with what only it knows
    (``num_classes`` and ``embedding_dim``; the training class counts for the head loss; the
    parameters for the optimiser), the way LightningCLI's ``OptimizerCallable`` works, so
    ``--help`` lists each component's arguments and a sweep can set any of them.

    Args:
        class_names: the classes, in label order (linked from ``data.class_names`` by the CLI).
        backbone: timm model name (``resnet18``, ``convnext_tiny``, ...).
        in_chans: input channels (1 for grey X-rays without replication).
        pretrained_path: local weights file for the backbone (nothing is downloaded).
        backbone_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, ...).
        embedding_dim: output dimension of the projector (the metric-loss embedding).
        metric_loss: the metric loss: a short name (``supcon``, ``triplet``, ``multi_similarity``,
            ``class_center_triplet``, ... of ``METRIC_LOSSES``) or a class called as
            ``cls(num_classes, embedding_dim)`` (``--model.metric_loss=SupCon
            --model.metric_loss.temperature=0.05``).
        metric_loss_kwargs: arguments for a short-name metric loss (``{temperature: 0.1}``);
            with a class, give them as its init_args instead.
        metric_weight: lambda of ``CE + lambda x metric``; 0 is the one-stage CE baseline.
        metric_only: train the backbone with the metric loss alone; the head then trains on
            detached features (a linear probe that still selects the checkpoint).
        head_loss: the classifier loss: a short name of ``HEAD_LOSSES`` (``ce``,
            ``balanced_softmax``, ``ldam``, ...) or a class called with the training class
            counts (``--model.head_loss=LogitAdjustedLoss --model.head_loss.tau=0.5``).
        head_loss_kwargs: arguments for a short-name head loss.
        class_weighting: per-class weights of the metric loss: ``none``, ``inverse`` or
            ``effective_number``.
        class_weighting_beta: beta of ``effective_number`` (Cui et al. 2019).
        gather_across_ranks: under DDP the metric loss sees the whole global batch.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9), or a ``torch.optim`` class called with
            the parameter groups (``--model.optimizer=SGD --model.optimizer.nesterov=true``);
            ``lr`` and ``weight_decay`` below always apply.
        lr: learning rate at ``base_batch_size`` images per step.
        weight_decay: weight decay.
        lr_scheduler: ``cosine`` (per-step cosine to 0 over the run) or ``constant``, or a
            scheduler class called with the optimiser (stepped every optimiser step).
        warmup_steps: linear warm-up steps before the cosine (0: none, the schedule of before).
        lr_scaling: scale ``lr`` with the global batch: ``none``, ``linear`` or ``sqrt``.
        base_batch_size: the global batch ``lr`` is tuned for (``lr_scaling``).
        loss_lr_multiplier: learning-rate factor of the loss's own weights (proxies, centres).
        many_shot_threshold: classes with more training images are many-shot.
        few_shot_threshold: classes with fewer training images are few-shot.
    """

    stage: ClassVar[str] = "stage1"

    def __init__(
        self,
        class_names: Sequence[str],
        backbone: str = "resnet18",
        in_chans: int = 3,
        pretrained_path: str | None = None,
        backbone_kwargs: dict | None = None,
        embedding_dim: int = 128,
        metric_loss: str | MetricLossFactory = "supcon",
        metric_loss_kwargs: dict | None = None,
        metric_weight: float = 1.0,
        metric_only: bool = False,
        head_loss: str | HeadLossFactory = "ce",
        head_loss_kwargs: dict | None = None,
        class_weighting: str = "none",
        class_weighting_beta: float = 0.999,
        gather_across_ranks: bool = True,
        optimizer: str | OptimizerFactory = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_scheduler: str | SchedulerFactory = "cosine",
        warmup_steps: int = 0,
        lr_scaling: str = "none",
        base_batch_size: int = 256,
        loss_lr_multiplier: float = 1.0,
        many_shot_threshold: int = 100,
        few_shot_threshold: int = 20,
    ):
        super().__init__(class_names, many_shot_threshold, few_shot_threshold)
        check_optimization_args(optimizer, lr_scheduler, warmup_steps)
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
        class_weights_from_counts([1, 1], class_weighting, class_weighting_beta)  # unknown scheme fails now
        HEAD_LOSSES.resolve(head_loss)  # an unknown short name fails now
        self._head_loss_spec, self._optimizer, self._lr_scheduler = head_loss, optimizer, lr_scheduler
        self.head_loss = None  # built in setup(): it needs the training class counts
        self.metric_loss = build_metric_loss(
            metric_loss,
            num_classes=self.num_classes,
            embedding_dim=embedding_dim,
            class_weighted=class_weighting != "none",
            **(metric_loss_kwargs or {}),
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        hp = self.hparams
        plain_ce = is_plain_ce(self._head_loss_spec, hp.head_loss_kwargs)
        if plain_ce and hp.class_weighting == "none":
            return
        # a re-balancing loss without the training counts would silently be plain CE: refuse
        reader = f"{type(self).__name__} (model.head_loss / model.class_weighting need training counts)"
        datamodule = require(self.trainer.datamodule, TrainingCounts, reader)
        if not plain_ce:
            self.head_loss = build_head_loss(self._head_loss_spec, datamodule.class_counts, **(hp.head_loss_kwargs or {}))
        if hp.class_weighting != "none":
            weights = class_weights_from_counts(datamodule.class_counts, hp.class_weighting, hp.class_weighting_beta)
            self.metric_loss.set_class_weights(weights)

    def on_train_epoch_start(self) -> None:
        for loss in (self.metric_loss, self.head_loss):  # progressive schedules, LDAM-DRW
            if hasattr(loss, "set_epoch"):
                loss.set_epoch(self.current_epoch)

    def backbone_config(self) -> dict:
        """What stage 2 needs to rebuild the same backbone (weights come from the checkpoint)."""
        hp = self.hparams
        return {"name": hp.backbone, "in_chans": hp.in_chans, "kwargs": dict(hp.backbone_kwargs or {})}

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def logits_and_embeddings(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        return self.head(features), self.projector(features)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        features = self.backbone(images)
        hp = self.hparams
        head_input = features.detach() if hp.metric_only else features
        logits = self.head(head_input)
        ce = self.head_loss(logits, targets) if self.head_loss is not None else F.cross_entropy(logits, targets)
        loss = ce
        logs = {"train/ce": ce}
        if hp.metric_weight > 0:
            embeddings, labels = self.projector(features), targets
            if hp.gather_across_ranks and world()[0] > 1:
                embeddings, labels = gather_across_ranks(embeddings), gather_across_ranks(labels)
            metric = self.metric_loss(embeddings, labels)
            loss = ce + hp.metric_weight * metric  # with metric_only, ce reaches the head only
            logs["train/metric"] = metric
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def configure_optimizers(self):
        """Loss-owned weights (proxies, ArcFace W, centres) may learn faster (loss_lr_multiplier)."""
        hp = self.hparams
        loss_params = list(self.metric_loss.parameters())
        loss_ids = {id(p) for p in loss_params}
        groups = [{"params": [p for p in self.parameters() if id(p) not in loss_ids]}]
        if loss_params:
            groups.append({"params": loss_params, "lr": hp.lr * hp.loss_lr_multiplier})
        return self.make_optimizer(groups, self._optimizer, hp.lr, hp.weight_decay)
