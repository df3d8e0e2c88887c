"""Kimia Path24's accuracy measures (Babaie et al., CVPR-W 2017), from a confusion matrix.

With ``n_tot`` test patches, ``R_s`` the correctly classified test patches of scan ``s`` and
``n_s`` the test patches of scan ``s`` (rows of the confusion matrix = true scan):

* patch-to-scan accuracy ``eta_p = sum_s R_s / n_tot`` (plain accuracy over patches);
* whole-scan accuracy ``eta_W = (1/|S|) sum_s R_s / n_s``: the mean of per-scan accuracies,
  i.e. the mean per-class recall (= balanced accuracy), over the scans that have test patches;
* total accuracy ``eta_total = eta_p * eta_W``.

Note: the evaluation script distributed with the data set divides by confusion-matrix column
sums in its whole-scan term (patches *predicted* as scan ``s``), a per-class precision, which
differs from the paper's definition above whenever errors are not symmetric; we follow the
paper. A class is a scan in Kimia Path24, so these apply to any single-label patch set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medmetric.lightning_modules.metrics.classification import balanced_accuracy_from_confusion

__all__ = ["confusion_from_predictions", "kimia_accuracies"]


def confusion_from_predictions(targets, predictions, num_classes: int) -> Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    predictions = torch.as_tensor(predictions, dtype=torch.long).reshape(-1)
    if targets.shape != predictions.shape:
        raise ValueError(f"targets and predictions differ in length: {len(targets)} vs {len(predictions)}")
    if len(targets) and (min(targets.min(), predictions.min()) < 0 or max(targets.max(), predictions.max()) >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes})")
    flat = targets * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def kimia_accuracies(confusion) -> dict[str, float]:
    """``eta_p``, ``eta_W`` and ``eta_total`` of a confusion matrix (rows = true scan)."""
    confusion = torch.as_tensor(confusion).double()
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {tuple(confusion.shape)}")
    total = confusion.sum()
    eta_p = float(confusion.diagonal().sum() / total) if total > 0 else float("nan")
    eta_w = balanced_accuracy_from_confusion(confusion)
    return {"eta_p": eta_p, "eta_W": eta_w, "eta_total": eta_p * eta_w}
