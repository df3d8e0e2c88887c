"""Single-label multi-class validation/test metrics that agree with scikit-learn.

For imbalanced medical data (e.g. ISIC, where the headline metric is balanced
accuracy = mean per-class recall) the handling of classes that are rare or absent
in an evaluation split changes the numbers. torchmetrics (1.9) differs from
scikit-learn there: its macro recall scores a class that is absent from the
targets but predicted as 0 and averages it in, and its multiclass AUROC scores an
absent class as 0 and averages that in too. So this module keeps only two
torchmetrics states, which are moved by ``.to(device)`` and synced under DDP by
torchmetrics itself:

* a ``MulticlassConfusionMatrix`` (sum-reduced), from which recall, F1,
  accuracy and balanced accuracy are computed with scikit-learn's conventions;
* a ``MulticlassAUROC`` (``thresholds=None``: exact, cat-reduced states) with
  ``average=None``, whose per-class values are averaged over present classes only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAUROC, MulticlassConfusionMatrix

__all__ = ["ClassificationMetrics"]

_NAN = float("nan")


class ClassificationMetrics(torch.nn.Module):
    """Balanced accuracy, macro F1, per-class recall, accuracy and macro AUROC.

    Accumulate with :meth:`update`, read with :meth:`compute`, clear with :meth:`reset`.
    Values equal scikit-learn's on the same data:

    * ``balanced_accuracy``: ``balanced_accuracy_score(y, argmax)``, i.e. mean recall
      over the classes present in the targets.
    * ``macro_f1``: ``f1_score(y, argmax, average="macro", zero_division=0)``, i.e. mean
      F1 over the classes present in the targets or the predictions.
    * ``accuracy``: ``accuracy_score(y, argmax)``.
    * ``macro_auroc``: ``roc_auc_score(y, softmax(logits), multi_class="ovr",
      average="macro", labels=range(C))`` when every class is present. When some class
      is absent from the targets (where scikit-learn raises) it is the mean one-vs-rest
      AUROC over the present classes; NaN if fewer than two classes are present.
    * ``recall/<class_name>``: that class's recall; NaN if the class is absent from
      the targets.

    With no samples at all, every value is NaN.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__()
        names = [str(n) for n in class_names]
        if len(names) < 2:
            raise ValueError(f"need at least 2 classes, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        self.class_names: list[str] = names
        self.num_classes = len(names)
        self.metrics = MetricCollection(
            {
                "confmat": MulticlassConfusionMatrix(num_classes=self.num_classes),
                "auroc": MulticlassAUROC(
                    num_classes=self.num_classes, average=None, thresholds=None
                ),
            },
            compute_groups=False,
        )

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: ``logits`` (N, C) float, ``target`` (N,) integer class ids."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (N, {self.num_classes}), got {tuple(logits.shape)}"
            )
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}"
            )
        logits = logits.detach()
        target = target.detach().long()
        # float64 softmax: keeps the per-class ranking (hence AUROC) as close to an
        # exact computation as possible, and is robust to bf16/fp16 logits.
        probs = logits.double().softmax(dim=1)
        self.metrics["confmat"].update(logits.argmax(dim=1), target)
        self.metrics["auroc"].update(probs, target)

    def confusion_matrix(self) -> Tensor:
        """The (C, C) long confusion matrix accumulated so far (rows = true class), synced."""
        return self.metrics["confmat"].compute()

    def compute(self) -> dict[str, float]:
        """Flat dict of Python floats: summary metrics and ``recall/<class_name>``."""
        cm = self.confusion_matrix().double().cpu()
        total = cm.sum()
        tp = cm.diagonal()
        support = cm.sum(dim=1)  # true count per class
        predicted = cm.sum(dim=0)  # predicted count per class
        present = support > 0

        recall = torch.where(present, tp / support.clamp_min(1), torch.full_like(tp, _NAN))

        # Classes present in the targets or the predictions have 2TP + FP + FN > 0, so
        # zero_division never arises for them; the others are left out of the mean.
        f1_denom = support + predicted
        in_f1 = f1_denom > 0
        f1 = 2 * tp[in_f1] / f1_denom[in_f1]

        if total > 0:
            balanced_accuracy = recall[present].mean().item()
            macro_f1 = f1.mean().item()
            accuracy = (tp.sum() / total).item()
        else:
            balanced_accuracy = macro_f1 = accuracy = _NAN

        # Decided on the synced matrix, so every DDP rank takes the same branch (and
        # therefore joins the AUROC state sync) or none does.
        if int(present.sum()) >= 2:
            with warnings.catch_warnings():
                # torchmetrics warns and returns 0 for classes absent from the targets;
                # those are dropped here.
                warnings.filterwarnings("ignore", message="No positive samples in targets")
                per_class_auroc = self.metrics["auroc"].compute().double().cpu()
            macro_auroc = per_class_auroc[present].mean().item()
        else:
            macro_auroc = _NAN

        out = {
            "balanced_accuracy": float(balanced_accuracy),
            "macro_f1": float(macro_f1),
            "accuracy": float(accuracy),
            "macro_auroc": float(macro_auroc),
        }
        for name, value in zip(self.class_names, recall.tolist(), strict=True):
            out[f"recall/{name}"] = float(value)
        return out

    def reset(self) -> None:
        """Clear all accumulated state."""
        self.metrics.reset()
