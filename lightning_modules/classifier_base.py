"""What stage 1 and stage 2 share: validation/test metrics, their logging, the optimiser."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor

from medmetric.datamodules.contracts import TrainingCounts, require
from medmetric.lightning_modules.checkpoint_check import check_checkpoint_matches
from medmetric.lightning_modules.losses.distributed import gather_across_ranks
from medmetric.lightning_modules.metrics import ClassificationMetrics
from medmetric.lightning_modules.optimization import OptimizerMixin

MONITOR = "val/balanced_accuracy"  # model selection: validation only, never test


class ClassifierModule(OptimizerMixin, L.LightningModule):
    """A LightningModule whose ``forward(images)`` returns class logits.

    Shot groups (many/medium/few-shot accuracy) use the training counts: many > ``many_shot_threshold``
    images, few < ``few_shot_threshold``, medium in between (OLTR convention: 100 and 20).

    Validation and test accumulate :class:`ClassificationMetrics` (DDP-synced by torchmetrics)
    and log them as ``val/<name>`` and ``test/<name>``; the last test results stay in
    ``self.test_results`` for the results writer.

    A subclass declares ``stage`` ("stage1"/"stage2": the CLI reads it from the class,
    lightning_modules/contracts.py); ``monitor`` is the checkpoint metric for all of them.
    """

    monitor: ClassVar[str] = MONITOR  # the CLI's ModelCheckpoint reads this (mode max)
    results_extra: ClassVar[Mapping] = MappingProxyType({})  # no extra results.json fields

    def __init__(self, class_names: Sequence[str], many_shot_threshold: int = 100, few_shot_threshold: int = 20):
        super().__init__()
        self.shot_thresholds = {"many_shot_threshold": many_shot_threshold, "few_shot_threshold": few_shot_threshold}
        if len(class_names) < 2:
            raise ValueError(f"class_names needs at least two classes, got {list(class_names)}")
        self.class_names = list(class_names)
        self.val_metrics = ClassificationMetrics(self.class_names)
        self.test_metrics = ClassificationMetrics(self.class_names)
        self.test_results: dict[str, float] | None = None
        self.test_confusion: list[list[int]] | None = None
        self.test_outputs: dict[str, Tensor] | None = None
        self._test_batches: list[tuple[Tensor, Tensor, Tensor | None]] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_metrics.update(self(images), targets)

    def logits_and_embeddings(self, inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits and the representation the report projects to 2-D (None: no embedding)."""
        return self(inputs), None

    def setup(self, stage: str) -> None:
        """Shot-group accuracies need the training class counts, known once data is set up.

        A DataModule without ``class_counts`` is refused (it used to drop the shot groups
        silently); with no DataModule at all (plain dataloaders) there are no training counts
        to group by, and the metrics are the plain ones."""
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            counts = require(datamodule, TrainingCounts, f"{type(self).__name__} (shot-group accuracies)").class_counts
            self.val_metrics = ClassificationMetrics(self.class_names, train_counts=counts, **self.shot_thresholds)
            self.test_metrics = ClassificationMetrics(self.class_names, train_counts=counts, **self.shot_thresholds)

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits, embeddings = self.logits_and_embeddings(images)
        self.test_metrics.update(logits, targets)
        self._test_batches.append((logits.softmax(1).float(), targets, None if embeddings is None else embeddings.float()))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.test_metrics.confusion_matrix().tolist()
        self.test_results = self._log_metrics("test", self.test_metrics)
        probs, targets, embeddings = zip(*self._test_batches, strict=True) if self._test_batches else ((), (), ())
        self._test_batches = []
        if probs:
            outputs = {"probs": torch.cat(probs), "targets": torch.cat(targets)}
            if embeddings[0] is not None:
                outputs["embeddings"] = torch.cat(embeddings)
            self.test_outputs = {k: gather_across_ranks(v).cpu() for k, v in outputs.items()}

    def _log_metrics(self, prefix: str, metrics: ClassificationMetrics) -> dict[str, float]:
        values = metrics.compute()  # already reduced across ranks
        metrics.reset()
        if not self.trainer.sanity_checking:
            # NaN (a class absent from a split) cannot be a monitored value; log only numbers
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)})
        return values

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another class list / backbone before its weights are loaded."""
        trainer = self._trainer
        where = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        check_checkpoint_matches(checkpoint, self.hparams, type(self).__name__, where)
