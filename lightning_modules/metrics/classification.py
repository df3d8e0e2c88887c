"""Single-label multi-class validation/test metrics that agree with scikit-learn.

For imbalanced medical data (e.g. ISIC, where the headline metric is balanced
accuracy = mean per-class recall) the handling of classes that are rare or absent
in an evaluation split changes the numbers. torchmetrics (1.9) differs from
scikit-learn there: its macro recall scores a class that is absent from the
targets but predicted as 0 and averages it in, and its multiclass AUROC scores an
absent class as 0 and averages that in too. So this module keeps only torchmetrics
states, which are moved by ``.to(device)`` and synced under DDP by torchmetrics
itself, and computes every value from them with scikit-learn's conventions:

* a ``MulticlassConfusionMatrix`` (sum-reduced), from which recall, precision, F1,
  accuracy, balanced accuracy and the shot-group accuracies are computed;
* a ``MulticlassAUROC`` (``thresholds=None``: exact, cat-reduced states) with
  ``average=None``, whose per-class values are averaged over present classes only;
* :class:`CalibrationBins` (sum-reduced per-bin count, correct count and confidence
  sum), from which the expected calibration error is computed exactly under DDP.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAUROC, MulticlassConfusionMatrix

__all__ = ["CalibrationBins", "ClassificationMetrics"]

_NAN = float("nan")


def balanced_accuracy_from_confusion(confusion: Tensor) -> float:
    """Mean recall over the classes present in the targets (rows = true class), as
    sklearn's ``balanced_accuracy_score``; NaN for an empty matrix."""
    confusion = confusion.double()
    support = confusion.sum(dim=1)
    present = support > 0
    if not present.any():
        return _NAN
    return (confusion.diagonal()[present] / support[present]).mean().item()


class CalibrationBins(Metric):
    """Per-bin sums for the expected calibration error (Guo et al., ICML 2017).

    Confidences in ``[0, 1]`` fall into ``num_bins`` equal-width bins
    ``((b - 1)/M, b/M]`` (a confidence of exactly 0 goes into the first bin). The states
    are sums (``dist_reduce_fx="sum"``), so the synced result is exactly that of one
    process seeing all samples:

    * ``count[b]``: samples in bin b;
    * ``correct[b]``: correctly classified samples in bin b;
    * ``confidence[b]``: sum of the confidences in bin b (float64).

    ``compute()`` returns ``ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|
    = sum_b |correct[b] - confidence[b]| / N`` (NaN with no samples).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_bins: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_bins) < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = int(num_bins)
        self.add_state("count", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "correct", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state(
            "confidence", torch.zeros(self.num_bins, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """``confidence`` (N,) in [0, 1], ``correct`` (N,) bool: prediction was right."""
        confidence = confidence.detach().to(device=self.count.device, dtype=torch.float64)
        correct = correct.detach().to(device=self.count.device)
        # Interior edges b/M, b = 1..M-1; right=False puts x into bin i with
        # edges[i-1] < x <= edges[i], i.e. the half-open bins ((b-1)/M, b/M].
        edges = (
            torch.arange(1, self.num_bins, dtype=torch.float64, device=confidence.device)
            / self.num_bins
        )
        bins = torch.bucketize(confidence, edges, right=False)
        self.count += torch.bincount(bins, minlength=self.num_bins)
        self.correct += torch.bincount(bins[correct.bool()], minlength=self.num_bins)
        self.confidence += torch.zeros_like(self.confidence).index_add_(0, bins, confidence)

    def compute(self) -> Tensor:
        total = self.count.sum()
        if total == 0:
            return torch.tensor(_NAN, dtype=torch.float64)
        return (self.correct.double() - self.confidence).abs().sum() / total.double()


class ClassificationMetrics(torch.nn.Module):
    """Balanced accuracy, macro F1, accuracy, macro AUROC, ECE and per-class/shot metrics.

    Accumulate with :meth:`update`, read with :meth:`compute`, clear with :meth:`reset`.
    Values equal scikit-learn's on the same data (``y`` = targets, ``argmax`` = predicted
    class, ``softmax`` computed in float64):

    * ``balanced_accuracy``: ``balanced_accuracy_score(y, argmax)``, i.e. mean recall
      over the classes present in the targets.
    * ``macro_f1``: ``f1_score(y, argmax, average="macro", zero_division=0)``, i.e. mean
      F1 over the classes present in the targets or the predictions.
    * ``accuracy``: ``accuracy_score(y, argmax)``.
    * ``macro_auroc``: ``roc_auc_score(y, softmax(logits), multi_class="ovr",
      average="macro", labels=range(C))`` when every class is present. When some class
      is absent from the targets (where scikit-learn raises) it is the mean one-vs-rest
      AUROC over the present classes; NaN if fewer than two classes are present.
    * ``ece``: expected calibration error of the max-softmax confidence, ``ece_bins``
      equal-width bins ``((b-1)/M, b/M]`` (Guo et al. 2017): ``sum_b |B_b|/N *
      |acc(B_b) - conf(B_b)|``.
    * ``many_shot_accuracy``, ``medium_shot_accuracy``, ``few_shot_accuracy`` (only when
      ``train_counts`` is given): mean per-class recall over the classes with training
      count ``> many_shot_threshold``, in ``[few_shot_threshold, many_shot_threshold]``,
      and ``< few_shot_threshold`` respectively (Liu et al., OLTR, CVPR 2019: many > 100,
      few < 20), taken over the classes of the group that are present in the targets;
      NaN when none is.
    * ``recall/<class_name>``: that class's recall; NaN if the class is absent from
      the targets.
    * ``precision/<class_name>``, ``f1/<class_name>``: ``precision_recall_fscore_support(
      y, argmax, average=None, labels=range(C), zero_division=0)``, i.e. precision 0 for
      a class never predicted, F1 ``2TP / (2TP + FP + FN)``; NaN for a class that is in
      neither the targets nor the predictions (scikit-learn's 0 there is only its
      zero-division filler; ``macro_f1`` is the mean of the non-NaN ``f1/<name>``).
    * ``auroc/<class_name>``: one-vs-rest AUROC of ``softmax[:, c]`` for ``y == c``
      (``roc_auc_score(y == c, softmax[:, c])``); NaN if the class is absent from the
      targets or no other class is present. ``macro_auroc`` is their mean over the
      present classes.

    With no samples at all, every value is NaN.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        train_counts: Sequence[int] | Tensor | None = None,
        many_shot_threshold: int = 100,
        few_shot_threshold: int = 20,
        ece_bins: int = 15,
    ) -> None:
        super().__init__()
        names = [str(n) for n in class_names]
        if len(names) < 2:
            raise ValueError(f"need at least 2 classes, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        self.class_names: list[str] = names
        self.num_classes = len(names)
        if few_shot_threshold > many_shot_threshold:
            raise ValueError(
                f"few_shot_threshold ({few_shot_threshold}) must be <= "
                f"many_shot_threshold ({many_shot_threshold})"
            )
        self.many_shot_threshold = many_shot_threshold
        self.few_shot_threshold = few_shot_threshold
        self.train_counts: list[int] | None = None
        if train_counts is not None:
            counts = torch.as_tensor(train_counts).detach().cpu().flatten().tolist()
            if len(counts) != self.num_classes or any(c < 0 or c != math.floor(c) for c in counts):
                raise ValueError(
                    f"train_counts must be {self.num_classes} non-negative integers, got {counts}"
                )
            self.train_counts = [int(c) for c in counts]
        self.metrics = MetricCollection(
            {
                "confmat": MulticlassConfusionMatrix(num_classes=self.num_classes),
                "auroc": MulticlassAUROC(
                    num_classes=self.num_classes, average=None, thresholds=None
                ),
                "calibration": CalibrationBins(num_bins=ece_bins),
            },
            compute_groups=False,
        )

    def shot_groups(self) -> dict[str, list[int]]:
        """Class indices of the many/medium/few-shot groups (empty without ``train_counts``)."""
        if self.train_counts is None:
            return {}
        many, few = self.many_shot_threshold, self.few_shot_threshold
        counts = self.train_counts
        return {
            "many": [c for c, n in enumerate(counts) if n > many],
            "medium": [c for c, n in enumerate(counts) if few <= n <= many],
            "few": [c for c, n in enumerate(counts) if n < few],
        }

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
        pred = logits.argmax(dim=1)
        self.metrics["confmat"].update(pred, target)
        self.metrics["auroc"].update(probs, target)
        confidence = probs.gather(1, pred.unsqueeze(1)).squeeze(1)
        self.metrics["calibration"].update(confidence, pred == target)

    def confusion_matrix(self) -> Tensor:
        """The (C, C) long confusion matrix accumulated so far (rows = true class), synced."""
        return self.metrics["confmat"].compute()

    def compute(self) -> dict[str, float]:
        """Flat dict of Python floats: summary metrics, then the per-class values."""
        cm = self.confusion_matrix().double().cpu()
        total = cm.sum()
        tp = cm.diagonal()
        support = cm.sum(dim=1)  # true count per class
        predicted = cm.sum(dim=0)  # predicted count per class
        present = support > 0
        nan = torch.full_like(tp, _NAN)

        recall = torch.where(present, tp / support.clamp_min(1), nan)
        # Classes present in the targets or the predictions have 2TP + FP + FN > 0, so
        # zero_division never arises for their F1; the others are NaN and left out of
        # the macro mean. Precision of a present class that is never predicted is 0
        # (scikit-learn's zero_division=0).
        f1_denom = support + predicted
        in_f1 = f1_denom > 0
        f1 = torch.where(in_f1, 2 * tp / f1_denom.clamp_min(1), nan)
        precision = torch.where(in_f1, tp / predicted.clamp_min(1), nan)

        if total > 0:
            balanced_accuracy = balanced_accuracy_from_confusion(cm)
            macro_f1 = f1[in_f1].mean().item()
            accuracy = (tp.sum() / total).item()
        else:
            balanced_accuracy = macro_f1 = accuracy = _NAN

        # Decided on the synced matrix, so every DDP rank takes the same branch (and
        # therefore joins the AUROC state sync) or none does.
        if int(present.sum()) >= 2:
            with warnings.catch_warnings():
                # torchmetrics warns and returns 0 for classes absent from the targets;
                # those are set to NaN here.
                warnings.filterwarnings("ignore", message="No positive samples in targets")
                auroc = self.metrics["auroc"].compute().double().cpu()
            auroc = torch.where(present, auroc, nan)
            macro_auroc = auroc[present].mean().item()
        else:
            auroc = nan.clone()
            macro_auroc = _NAN

        out = {
            "balanced_accuracy": float(balanced_accuracy),
            "macro_f1": float(macro_f1),
            "accuracy": float(accuracy),
            "macro_auroc": float(macro_auroc),
            "ece": float(self.metrics["calibration"].compute().item()),
        }
        for group, classes in self.shot_groups().items():
            members = [c for c in classes if bool(present[c])]
            out[f"{group}_shot_accuracy"] = (
                float(recall[members].mean().item()) if members else _NAN
            )
        for key, values in (
            ("recall", recall),
            ("precision", precision),
            ("f1", f1),
            ("auroc", auroc),
        ):
            for name, value in zip(self.class_names, values.tolist(), strict=True):
                out[f"{key}/{name}"] = float(value)
        return out

    def reset(self) -> None:
        """Clear all accumulated state."""
        self.metrics.reset()
