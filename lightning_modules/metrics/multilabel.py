"""Multi-label metrics for chest X-ray findings: per-label AUROC, mean AUROC, mAP, F1.

Conventions (each value agrees with scikit-learn, checked in tests/test_multilabel_metrics.py):

* ``auroc/<label>``: ``roc_auc_score`` of that label's column (ties handled as sklearn does).
  A label whose column is all 0 or all 1 in the split has no AUROC (NaN).
* ``mean_auroc``: the field's headline number, the mean of the per-label AUROCs **over the
  labels that have both positives and negatives in the split** (others are skipped, not
  counted as 0 or 0.5). ``mean_over`` restricts it further (e.g. to the seen labels in GZSL).
* ``ap/<label>`` and ``map``: ``average_precision_score`` per label, mean over labels with at
  least one positive.
* ``f1/<label>`` and ``macro_f1`` at per-label thresholds (``score >= threshold`` is positive),
  chosen on validation with :func:`choose_f1_thresholds`; a NaN threshold (a label with no
  positive in validation) gives a NaN F1. ``macro_f1`` averages the labels with positives and a
  threshold. F1 with no predicted and no true positive is 0, as sklearn's ``zero_division=0``.

Scores are any monotone "higher = more likely" value (logits, probabilities, negative
distances): AUROC and AP depend only on the ranking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.utilities import dim_zero_cat

__all__ = ["MultiLabelMetrics", "choose_f1_thresholds", "f1_at_thresholds", "gzsl_auroc", "per_label_auroc"]

_NAN = float("nan")


def _has_both(targets: Tensor) -> Tensor:
    positives = targets.sum(0)
    return (positives > 0) & (positives < targets.shape[0])


def per_label_auroc(scores: Tensor, targets: Tensor) -> Tensor:
    """AUROC per column (float64), NaN where a column lacks positives or negatives."""
    out = torch.full((scores.shape[1],), _NAN, dtype=torch.float64)
    valid = _has_both(targets)
    for c in torch.nonzero(valid).flatten().tolist():
        out[c] = binary_auroc(scores[:, c].double(), targets[:, c].long()).double()
    return out


def per_label_average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    out = torch.full((scores.shape[1],), _NAN, dtype=torch.float64)
    for c in torch.nonzero(targets.sum(0) > 0).flatten().tolist():
        out[c] = binary_average_precision(scores[:, c].double(), targets[:, c].long()).double()
    return out


def _nanmean(values: Tensor) -> float:
    values = values[~torch.isnan(values)]
    return values.mean().item() if len(values) else _NAN


def choose_f1_thresholds(scores: Tensor, targets: Tensor) -> Tensor:
    """Per label, the threshold maximising F1 of ``score >= threshold`` (chosen on validation).

    Every distinct score is a candidate cut; the returned threshold is the midpoint between the
    best cut and the next lower distinct score (the same predictions on these data, a margin on
    new data). Among equally good cuts the highest wins. NaN for a label without positives.
    """
    scores, targets = scores.detach().double().cpu(), targets.detach().double().cpu()
    thresholds = torch.full((scores.shape[1],), _NAN, dtype=torch.float64)
    for c in range(scores.shape[1]):
        positives = targets[:, c].sum()
        if positives == 0:
            continue
        order = torch.argsort(scores[:, c], descending=True, stable=True)
        s, y = scores[order, c], targets[order, c]
        tp, predicted = torch.cumsum(y, 0), torch.arange(1, len(s) + 1, dtype=torch.float64)
        last_of_value = torch.ones(len(s), dtype=torch.bool)  # cut after all ties of a value
        last_of_value[:-1] = s[1:] != s[:-1]
        f1 = torch.where(last_of_value, 2 * tp / (predicted + positives), torch.tensor(-1.0, dtype=torch.float64))
        best = int(torch.argmax(f1))  # first maximum = highest threshold
        lower = s[best + 1] if best + 1 < len(s) else s[best]
        thresholds[c] = (s[best] + lower) / 2
    return thresholds


def f1_at_thresholds(scores: Tensor, targets: Tensor, thresholds: Tensor) -> Tensor:
    """F1 per label of ``score >= threshold`` (float64; NaN where the threshold is NaN)."""
    thresholds = thresholds.to(scores.device, torch.float64)
    predicted = scores.double() >= thresholds
    truth = targets.bool()
    tp = (predicted & truth).sum(0).double()
    denominator = predicted.sum(0).double() + truth.sum(0).double()
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))
    return torch.where(torch.isnan(thresholds), torch.full_like(f1, _NAN), f1).cpu()


def gzsl_auroc(scores: Tensor, targets: Tensor, seen_idx: Sequence[int], unseen_idx: Sequence[int]) -> dict[str, float]:
    """Generalised zero-shot AUROC (Hayat et al., CXR-ML-GZSL 2021): mean AUROC over the seen
    labels, over the unseen labels (each on all test images), and their harmonic mean
    ``2 s u / (s + u)``."""
    auroc = per_label_auroc(scores, targets)
    seen = _nanmean(auroc[list(seen_idx)])
    unseen = _nanmean(auroc[list(unseen_idx)])
    harmonic = 2 * seen * unseen / (seen + unseen) if not (math.isnan(seen) or math.isnan(unseen)) and seen + unseen > 0 else _NAN
    return {"seen_auroc": seen, "unseen_auroc": unseen, "harmonic_auroc": harmonic}


class MultiLabelMetrics(Metric):
    """Accumulates (scores, multi-hot targets) with ``cat``-reduced states; see the module doc.

    Args:
        label_names: the columns' names (keys ``auroc/<name>``, ``ap/<name>``, ``f1/<name>``).
        mean_over: names the means (``mean_auroc``, ``map``, ``macro_f1``) average over;
            default all.
        thresholds: per-label F1 thresholds; set later with :meth:`set_thresholds`. Without
            them no F1 is reported.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, label_names: Sequence[str], mean_over: Sequence[str] | None = None, thresholds: Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.label_names = list(label_names)
        unknown = sorted(set(mean_over or ()) - set(self.label_names))
        if unknown:
            raise ValueError(f"mean_over names unknown labels {unknown}; labels: {self.label_names}")
        self.mean_idx = [self.label_names.index(n) for n in mean_over] if mean_over is not None else list(range(len(self.label_names)))
        self.thresholds = None
        if thresholds is not None:
            self.set_thresholds(thresholds)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def set_thresholds(self, thresholds: Tensor | None) -> None:
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
            if thresholds.shape != (len(self.label_names),):
                raise ValueError(f"thresholds need shape ({len(self.label_names)},), got {tuple(thresholds.shape)}")
        self.thresholds = thresholds

    def update(self, scores: Tensor, targets: Tensor) -> None:
        if scores.shape != targets.shape or scores.ndim != 2 or scores.shape[1] != len(self.label_names):
            raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be (N, {len(self.label_names)})")
        self.scores.append(scores.detach().float())
        self.targets.append(targets.detach().float())

    def scores_and_targets(self) -> tuple[Tensor, Tensor]:
        """All accumulated (scores, targets) on this process (synced inside ``compute``)."""
        if isinstance(self.scores, list) and not self.scores:  # synced states are tensors
            n = len(self.label_names)
            return torch.zeros(0, n), torch.zeros(0, n)
        return dim_zero_cat(self.scores).cpu(), dim_zero_cat(self.targets).cpu()

    def compute(self) -> dict[str, float]:
        scores, targets = self.scores_and_targets()
        return summarise(scores, targets, self.label_names, self.mean_idx, self.thresholds)


def summarise(scores: Tensor, targets: Tensor, label_names: Sequence[str], mean_idx: Sequence[int], thresholds: Tensor | None) -> dict[str, float]:
    """Every value of :class:`MultiLabelMetrics` from full (scores, targets)."""
    auroc = per_label_auroc(scores, targets)
    ap = per_label_average_precision(scores, targets)
    values = {"mean_auroc": _nanmean(auroc[list(mean_idx)]), "map": _nanmean(ap[list(mean_idx)])}
    values.update({f"auroc/{n}": float(v) for n, v in zip(label_names, auroc, strict=True)})
    values.update({f"ap/{n}": float(v) for n, v in zip(label_names, ap, strict=True)})
    if thresholds is not None:
        f1 = f1_at_thresholds(scores, targets, thresholds)
        with_positives = targets.sum(0).cpu() > 0
        f1_mean = torch.where(with_positives, f1, torch.full_like(f1, _NAN))
        values["macro_f1"] = _nanmean(f1_mean[list(mean_idx)])
        values.update({f"f1/{n}": float(v) for n, v in zip(label_names, f1, strict=True)})
    return values
