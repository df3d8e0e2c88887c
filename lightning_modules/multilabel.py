"""What every multi-label (chest X-ray) module shares: validation, test, thresholds, GZSL.

A subclass implements ``forward(images) -> scores (B, num_classes)`` (higher = more likely:
logits, or negative distances to label prototypes) and ``training_step``. This base then

* accumulates :class:`MultiLabelMetrics` on validation and test and logs ``val/mean_auroc``
  (the checkpoint monitor, ``monitor`` below, mode max), ``val/map``, ``val/macro_f1`` and the
  per-label values (``val/auroc/<label>``...);
* picks per-label F1 thresholds on each validation epoch (kept in the ``f1_thresholds`` buffer,
  so the checkpoint chosen on validation carries its own) and applies them on test;
* in generalised zero-shot mode (the DataModule's ``unseen_labels`` is non-empty) averages the
  validation metrics over the seen labels only, and logs ``test/seen_auroc``,
  ``test/unseen_auroc`` and ``test/harmonic_auroc``;
* leaves the test values in ``self.test_results`` (and ``results_extra``) for
  callbacks/results.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor

from medmetric.datamodules.contracts import MULTILABEL_FIX, MultiLabelData, require
from medmetric.lightning_modules.metrics.multilabel import (
    MultiLabelMetrics,
    choose_f1_thresholds,
    gzsl_auroc,
)
from medmetric.lightning_modules.optimization import OptimizerMixin


class MultiLabelClassifierModule(OptimizerMixin, L.LightningModule):
    """Base of the multi-label modules; see the module docstring."""

    monitor: ClassVar[str] = "val/mean_auroc"  # the CLI's ModelCheckpoint reads this (mode max)
    test_confusion: ClassVar[None] = None  # the results writer's single-label field: not for multi-label
    test_outputs: ClassVar[None] = None  # no per-image test_outputs.npz for multi-label runs

    def __init__(self, class_names: Sequence[str]):
        super().__init__()
        if len(class_names) < 1 or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be distinct label names, got {list(class_names)}")
        self.class_names = list(class_names)
        self.unseen_labels: list[str] = []
        self.register_buffer("f1_thresholds", torch.full((len(self.class_names),), math.nan, dtype=torch.float64))
        self.val_metrics = MultiLabelMetrics(self.class_names)
        self.test_metrics = MultiLabelMetrics(self.class_names)
        self.test_results: dict[str, float] | None = None
        self.results_extra: dict = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def seen_labels(self) -> list[str]:
        return [n for n in self.class_names if n not in self.unseen_labels]

    @property
    def seen_idx(self) -> list[int]:
        """Columns a training loss may use (all but the GZSL unseen labels)."""
        return [self.class_names.index(n) for n in self.seen_labels]

    @property
    def unseen_idx(self) -> list[int]:
        return [self.class_names.index(n) for n in self.unseen_labels]

    def setup(self, stage: str) -> None:
        """Read the GZSL unseen labels from the DataModule (empty: ordinary multi-label).

        A DataModule without ``unseen_labels`` is refused (it used to mean "no GZSL" silently);
        with no trainer or no DataModule (unit tests, plain dataloaders) there are none."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:
            require(datamodule, MultiLabelData, f"{type(self).__name__} (multi-label losses, GZSL mode)", fix=MULTILABEL_FIX)
        unseen = list(datamodule.unseen_labels) if datamodule is not None else []
        unknown = [n for n in unseen if n not in self.class_names]
        if unknown:
            raise ValueError(f"data.unseen_labels {unknown} are not among the model's labels {self.class_names}")
        self.unseen_labels = unseen
        self.val_metrics = MultiLabelMetrics(self.class_names, mean_over=self.seen_labels)
        self.test_metrics = MultiLabelMetrics(self.class_names)

    # --- validation ------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_metrics.update(self(images), targets)

    def on_validation_epoch_end(self) -> None:
        with self.val_metrics.sync_context():
            scores, targets = self.val_metrics.scores_and_targets()
            thresholds = choose_f1_thresholds(scores, targets)
        thresholds[self.unseen_idx] = math.nan  # never tuned on (absent) unseen labels
        self.val_metrics.set_thresholds(thresholds)
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        self.f1_thresholds.copy_(thresholds)
        if math.isnan(values["mean_auroc"]):
            raise ValueError(
                "validation has no (seen) label with both positive and negative images, so val/mean_auroc "
                "is undefined; raise data.val_fraction or change data.split_seed (delete the split file first)"
            )
        self._log("val", values)

    # --- test ------------------------------------------------------------------------------------
    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.test_metrics.update(self(images), targets)

    def on_test_epoch_end(self) -> None:
        thresholds = self.f1_thresholds.detach().cpu()
        self.test_metrics.set_thresholds(None if torch.isnan(thresholds).all() else thresholds)
        values = self.test_metrics.compute()
        if self.unseen_labels:
            with self.test_metrics.sync_context():
                scores, targets = self.test_metrics.scores_and_targets()
                values.update(gzsl_auroc(scores, targets, self.seen_idx, self.unseen_idx))
        self.test_metrics.reset()
        self._log("test", values)
        self.test_results = values
        self.results_extra = {
            "task": "multilabel",
            "seen_labels": self.seen_labels,
            "unseen_labels": list(self.unseen_labels),
            "f1_thresholds": {n: float(t) for n, t in zip(self.class_names, thresholds, strict=True)},
        }

    def _log(self, prefix: str, values: dict[str, float]) -> None:
        # NaN (a label without positives in the split) cannot be monitored; log only numbers
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)})

    # --- GZSL ----------------------------------------------------------------------------------------
    def restrict_to_seen(self, scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The seen columns of (scores, targets): what a training loss may see in GZSL mode."""
        if not self.unseen_labels:
            return scores, targets
        idx = torch.as_tensor(self.seen_idx, device=scores.device)
        return scores.index_select(1, idx), targets.index_select(1, idx)
