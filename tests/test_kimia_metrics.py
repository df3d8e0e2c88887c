"""Kimia Path24 eta_p, eta_W, eta_total on a hand-computed confusion matrix."""

from __future__ import annotations

import math

import pytest
import torch

from medmetric.lightning_modules.metrics.kimia import confusion_from_predictions, kimia_accuracies


def test_hand_computed_confusion_matrix():
    # rows = true scan, columns = predicted scan
    confusion = [
        [8, 2, 0],   # scan 0: 10 patches, 8 right
        [0, 3, 1],   # scan 1: 4 patches, 3 right
        [0, 5, 1],   # scan 2: 6 patches, 1 right
    ]
    got = kimia_accuracies(confusion)
    eta_p = (8 + 3 + 1) / 20                 # 0.6
    eta_w = (8 / 10 + 3 / 4 + 1 / 6) / 3     # 0.572222...
    assert got["eta_p"] == pytest.approx(eta_p, abs=1e-15)
    assert got["eta_W"] == pytest.approx(eta_w, abs=1e-15)
    assert got["eta_total"] == pytest.approx(eta_p * eta_w, abs=1e-15)
    # the column-sum variant (patches predicted as each scan) is a different number here
    column_variant = (8 / 8 + 3 / 10 + 1 / 2) / 3  # 0.6
    assert abs(column_variant - got["eta_W"]) > 0.01


def test_scans_without_test_patches_are_left_out_of_eta_w():
    confusion = [[3, 1, 0], [0, 0, 0], [0, 2, 2]]
    got = kimia_accuracies(confusion)
    assert got["eta_W"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert got["eta_p"] == pytest.approx(5 / 8)
    assert math.isnan(kimia_accuracies([[0, 0], [0, 0]])["eta_p"])


def test_confusion_from_predictions_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (200,), generator=g)
    predictions = torch.randint(0, 5, (200,), generator=g)
    expected = torch.zeros(5, 5, dtype=torch.long)
    for t, p in zip(targets.tolist(), predictions.tolist(), strict=True):
        expected[t, p] += 1
    assert torch.equal(confusion_from_predictions(targets, predictions, 5), expected)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        confusion_from_predictions([5], [0], 5)
