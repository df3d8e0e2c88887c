"""Stage 2: re-balance the classifier on a frozen stage-1 backbone (Kang et al., ICLR 2020).

The backbone from the stage-1 handoff is frozen and kept in eval mode (BatchNorm statistics
untouched unless ``bn_reestimate``), and only the head strategy is trained or fitted
(lightning_modules/head_strategies.py: cRT, LWS, tau-norm, NCM, kNN). The head loss is any
re-balancing loss of lightning_modules/losses/rebalancing.py (CE, logit adjustment, balanced
softmax, class-balanced, LDAM-DRW, label-aware smoothing, focal), built from the stage-1
training class counts in the manifest. ``posthoc_tau`` subtracts tau * log(prior) from the
logits at evaluation (post-hoc logit adjustment, Menon et al., ICLR 2021, eq. 9).

With ``feature_cache`` the backbone features are computed once per backbone and transform
(callbacks/feature_cache.py) and batches are feature vectors: ``forward`` accepts images
(N, C, H, W) or features (N, F).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from medmetric.datamodules.contracts import LabelledData, OrderedEvalData, SplitIdentity, require
from medmetric.lightning_modules.backbones import create_backbone, load_backbone_weights
from medmetric.lightning_modules.classifier_base import ClassifierModule
from medmetric.lightning_modules.head_strategies import STRATEGIES, HeadStrategy
from medmetric.lightning_modules.heads import LinearHead, Projector
from medmetric.lightning_modules.losses.distributed import gather_across_ranks, world
from medmetric.lightning_modules.losses.rebalancing import HeadLossFactory, build_head_loss
from medmetric.lightning_modules.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    check_optimization_args,
)
from medmetric.lightning_modules.registry import target_class
from medmetric.run_io.manifest import check_manifest, load_submodule_state, read_manifest

#: ``model.strategy``: a strategy class whose remaining arguments are (feature_dim, num_classes, stage-1 head)
StrategyFactory = Callable[[int, int, LinearHead], HeadStrategy]


class RebalancedHeadModule(ClassifierModule):
    """Frozen stage-1 backbone + a re-balanced head.

    Args:
        class_names: must equal the stage-1 class list (checked against the manifest).
        handoff: path of the stage-1 ``handoff.json``; the CLI fills in
            ``runs/<experiment>/handoff.json`` when it is not given.
        strategy: ``crt``, ``lws``, ``tau_norm``, ``ncm`` or ``knn`` (``STRATEGIES``), or a
            strategy class called as ``cls(feature_dim, num_classes, stage1_head)``
            (``--model.strategy=NearestNeighbours --model.strategy.k=20``).
        strategy_kwargs: arguments for a short-name strategy (``{k: 20}`` for knn,
            ``{tau_grid: [0, 0.5, 1]}`` for tau_norm); with a class, give its init_args instead.
        head_loss: the loss of trainable strategies: a short name of ``HEAD_LOSSES`` (``ce``) or
            a class called with the stage-1 class counts (``--model.head_loss=LogitAdjustedLoss
            --model.head_loss.tau=0.5``).
        head_loss_kwargs: arguments for a short-name head loss.
        posthoc_tau: post-hoc logit adjustment strength at evaluation (0 = off).
        bn_reestimate: re-estimate the frozen backbone's BatchNorm statistics on the stage-2
            training batches first (MiSLAS shift-BN); off by default.
        feature_cache: train on cached backbone features (needs ``data.augment=none``).
        backbone: optional, only to assert the expected stage-1 backbone name.
        optimizer: ``sgd`` (momentum 0.9) or ``adamw``, or a ``torch.optim`` class called with
            the parameters; ``lr`` and ``weight_decay`` below always apply.
        lr: learning rate at ``base_batch_size`` images per step.
        weight_decay: weight decay.
        lr_scheduler: ``cosine`` (per step) or ``constant``, or a scheduler class called with the optimiser.
        warmup_steps: linear warm-up steps before the cosine (0: none, the schedule of before).
        lr_scaling: scale ``lr`` with the global batch: ``none``, ``linear`` or ``sqrt``.
        base_batch_size: the global batch ``lr`` is tuned for (``lr_scaling``).
        many_shot_threshold: classes with more training images are many-shot.
        few_shot_threshold: classes with fewer training images are few-shot.
        allow_fingerprint_mismatch: accept a data set whose fingerprint differs from stage 1's
            (refused by default: stage 1 saw other files, sizes, labels or groups).
    """

    stage: ClassVar[str] = "stage2"

    def __init__(
        self,
        class_names: Sequence[str],
        handoff: str | None = None,
        strategy: str | StrategyFactory = "crt",
        strategy_kwargs: dict | None = None,
        head_loss: str | HeadLossFactory = "ce",
        head_loss_kwargs: dict | None = None,
        posthoc_tau: float = 0.0,
        bn_reestimate: bool = False,
        feature_cache: bool = False,
        backbone: str | None = None,
        optimizer: str | OptimizerFactory = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        lr_scheduler: str | SchedulerFactory = "cosine",
        warmup_steps: int = 0,
        lr_scaling: str = "none",
        base_batch_size: int = 256,
        many_shot_threshold: int = 100,
        few_shot_threshold: int = 20,
        allow_fingerprint_mismatch: bool = False,
    ):
        super().__init__(class_names, many_shot_threshold, few_shot_threshold)
        check_optimization_args(optimizer, lr_scheduler, warmup_steps)
        strategy_factory = STRATEGIES.resolve(strategy)  # an unknown short name fails first
        if not handoff:
            raise ValueError(
                "model.handoff is not set: pass --experiment=<stage-1 experiment> (the CLI then reads "
                "runs/<experiment>/handoff.json) or --model.handoff=<path to handoff.json>"
            )
        if bn_reestimate and feature_cache:
            raise ValueError("model.bn_reestimate changes the features, model.feature_cache freezes them: use one")
        self.save_hyperparameters()
        self.manifest = read_manifest(handoff)
        check_manifest(self.manifest, class_names=self.class_names, backbone=backbone)
        config = self.manifest["backbone"]
        self.backbone, self.feature_dim = create_backbone(config["name"], config["in_chans"], **config["kwargs"])
        load_backbone_weights(self.backbone, self.manifest["backbone_weights"])
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self._optimizer, self._lr_scheduler = optimizer, lr_scheduler
        self.strategy = self._build_strategy(strategy_factory, strategy, strategy_kwargs or {})
        counts = torch.as_tensor(self.manifest["class_counts"], dtype=torch.float64)
        self.head_loss = build_head_loss(head_loss, self.manifest["class_counts"], **(head_loss_kwargs or {}))
        self.register_buffer("log_prior", torch.log(counts.clamp_min(1) / counts.sum()).float())
        self.automatic_optimization = self.strategy.trainable
        self._val_features: list[Tensor] = []
        self._val_targets: list[Tensor] = []

    def _build_strategy(self, factory: Callable, name, kwargs: dict):
        """Same creation order as ever (stage-1 head, then the projector for kNN, then the
        strategy), so the RNG is consumed as before."""
        stage1_head = LinearHead(self.feature_dim, self.num_classes)
        load_submodule_state(stage1_head, self.manifest["head_weights"])
        if getattr(target_class(factory), "uses_projector", False):
            projector = Projector(self.feature_dim, self.manifest["embedding_dim"])
            load_submodule_state(projector, self.manifest["projector_weights"])
            kwargs = {"projector": projector, **kwargs}
        try:
            return factory(self.feature_dim, self.num_classes, stage1_head, **kwargs)
        except TypeError as err:
            raise ValueError(f"bad arguments for strategy {name!r} (model.strategy_kwargs): {err}") from err

    # --- lifecycle -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        # the class list, split and fingerprint checks against stage 1 are not optional: a
        # DataModule that cannot answer them is refused (it used to skip them silently)
        datamodule = self.trainer.datamodule
        for needed in (LabelledData, SplitIdentity, OrderedEvalData):
            require(datamodule, needed, "stage 2 (RebalancedHeadModule: checks against the stage-1 manifest)")
        check_manifest(
            self.manifest, class_names=datamodule.class_names, split_sha256=datamodule.split_sha256(),
            fingerprint=datamodule.fingerprint(),
            allow_fingerprint_mismatch=self.hparams.allow_fingerprint_mismatch,
        )

    def train(self, mode: bool = True):
        """Lightning calls ``train()`` every epoch; the frozen backbone must stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def on_train_start(self) -> None:
        if self.hparams.bn_reestimate:
            self._reestimate_batchnorm()
        if not self.strategy.trainable:
            features, targets = self._all_training_features()
            self.strategy.fit(features, targets)

    def on_train_epoch_start(self) -> None:
        if hasattr(self.head_loss, "set_epoch"):  # LDAM's deferred re-weighting
            self.head_loss.set_epoch(self.current_epoch)

    # --- model -----------------------------------------------------------------------------
    def features(self, inputs: Tensor) -> Tensor:
        if inputs.ndim == 2:  # cached features
            return inputs
        with torch.no_grad():
            return self.backbone(inputs)

    def forward(self, inputs: Tensor) -> Tensor:
        return self._evaluation_logits(self.strategy(self.features(inputs)))

    def logits_and_embeddings(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(inputs)
        return self._evaluation_logits(self.strategy(features)), features

    def _evaluation_logits(self, logits: Tensor) -> Tensor:
        tau = self.hparams.posthoc_tau
        return logits - tau * self.log_prior if tau else logits

    def training_step(self, batch, batch_idx: int):
        if not self.strategy.trainable:
            return None  # post-hoc strategies were fitted in on_train_start
        inputs, targets = batch
        loss = self.head_loss(self.strategy(self.features(inputs)), targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.strategy.parameters() if p.requires_grad]
        if not params:
            return None
        hp = self.hparams
        return self.make_optimizer(params, self._optimizer, hp.lr, hp.weight_decay)

    # --- validation, with strategies that tune on it (tau-norm) -----------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, targets = batch
        if self.strategy.tunes_on_validation:
            self._val_features.append(self.features(inputs))
            self._val_targets.append(targets)
        else:
            self.val_metrics.update(self(inputs), targets)

    def on_validation_epoch_end(self) -> None:
        if self._val_features:
            local_features, local_targets = torch.cat(self._val_features), torch.cat(self._val_targets)
            self._val_features, self._val_targets = [], []
            chosen = self.strategy.select_on_validation(gather_across_ranks(local_features), gather_across_ranks(local_targets))
            if not self.trainer.sanity_checking:
                self.log_dict({f"val/{k}": v for k, v in chosen.items()})
            self.val_metrics.update(self._evaluation_logits(self.strategy(local_features)), local_targets)
        super().on_validation_epoch_end()

    # --- helpers ---------------------------------------------------------------------------
    def _all_training_features(self) -> tuple[Tensor, Tensor]:
        """Backbone features of every training image (eval transform), gathered over ranks."""
        features, targets = [], []
        for inputs, labels in self.trainer.datamodule.ordered_dataloader("train"):
            features.append(self.features(inputs.to(self.device)))
            targets.append(labels.to(self.device))
        return gather_across_ranks(torch.cat(features)), gather_across_ranks(torch.cat(targets))

    def _reestimate_batchnorm(self) -> None:
        """MiSLAS shift-BN: cumulative BatchNorm statistics over one pass of stage-2 batches."""
        norms = [m for m in self.backbone.modules() if isinstance(m, _BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for inputs, _ in self.trainer.datamodule.train_dataloader():
                self.backbone(inputs.to(self.device))
        size, _ = world()
        for norm in norms:
            norm.eval()
            if size > 1:
                for stat in (norm.running_mean, norm.running_var):
                    torch.distributed.all_reduce(stat)
                    stat /= size
