"""Multi-label metrics against scikit-learn: per-label AUROC, mean AUROC over labels with both
classes, mAP, F1 at validation-chosen thresholds, GZSL seen/unseen/harmonic AUROC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from medmetric.lightning_modules.metrics.multilabel import (
    MultiLabelMetrics,
    choose_f1_thresholds,
    gzsl_auroc,
)

NAMES = ["a", "b", "c", "d", "e"]


def make_data(seed: int = 0, n: int = 60):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 5)) < [0.3, 0.1, 0.5, 0.0, 0.2]).astype(np.float32)
    targets[:, 4] = 1.0  # label e: no negatives
    scores = np.round(rng.normal(size=(n, 5)) + 1.5 * targets, 1).astype(np.float32)  # rounding makes ties
    return torch.from_numpy(scores), torch.from_numpy(targets)


def test_auroc_map_match_sklearn_and_skip_degenerate_labels():
    scores, targets = make_data()
    metric = MultiLabelMetrics(NAMES)
    for chunk in range(0, 60, 17):  # several updates = one big one
        metric.update(scores[chunk : chunk + 17], targets[chunk : chunk + 17])
    values = metric.compute()
    expected_auroc = [roc_auc_score(targets[:, c], scores[:, c]) for c in range(3)]
    expected_ap = [average_precision_score(targets[:, c], scores[:, c]) for c in (0, 1, 2, 4)]
    for c in range(3):
        assert values[f"auroc/{NAMES[c]}"] == pytest.approx(expected_auroc[c], abs=1e-6)
    assert math.isnan(values["auroc/d"]) and math.isnan(values["auroc/e"])  # no positives / no negatives
    assert values["mean_auroc"] == pytest.approx(np.mean(expected_auroc), abs=1e-6)
    assert math.isnan(values["ap/d"])
    assert values["map"] == pytest.approx(np.mean(expected_ap), abs=1e-6)
    assert "macro_f1" not in values  # no thresholds yet


def test_mean_over_restricts_the_means():
    scores, targets = make_data(1)
    metric = MultiLabelMetrics(NAMES, mean_over=["b", "c"])
    metric.update(scores, targets)
    expected = np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in (1, 2)])
    assert metric.compute()["mean_auroc"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="unknown labels"):
        MultiLabelMetrics(NAMES, mean_over=["z"])


def test_chosen_thresholds_maximise_f1_over_every_cut():
    scores, targets = make_data(2)
    thresholds = choose_f1_thresholds(scores, targets)
    for c in (0, 1, 2, 4):
        column, truth = scores[:, c].numpy(), targets[:, c].numpy()
        best = max(f1_score(truth, column >= t, zero_division=0) for t in np.unique(column))
        assert f1_score(truth, column >= thresholds[c].item(), zero_division=0) == pytest.approx(best)
    assert math.isnan(thresholds[3])  # no positive: no threshold


def test_f1_at_thresholds_matches_sklearn_on_new_data():
    val_scores, val_targets = make_data(3)
    test_scores, test_targets = make_data(4)
    thresholds = choose_f1_thresholds(val_scores, val_targets)
    metric = MultiLabelMetrics(NAMES, thresholds=thresholds)
    metric.update(test_scores, test_targets)
    values = metric.compute()
    expected = {}
    for c in (0, 1, 2, 4):
        predicted = test_scores[:, c].numpy() >= thresholds[c].item()
        expected[c] = f1_score(test_targets[:, c].numpy(), predicted, zero_division=0)
        assert values[f"f1/{NAMES[c]}"] == pytest.approx(expected[c])
    assert math.isnan(values["f1/d"])
    assert values["macro_f1"] == pytest.approx(np.mean(list(expected.values())))


def test_gzsl_auroc_and_harmonic_mean():
    scores, targets = make_data(5)
    result = gzsl_auroc(scores, targets, seen_idx=[0, 1], unseen_idx=[2, 3])
    seen = np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in (0, 1)])
    unseen = roc_auc_score(targets[:, 2], scores[:, 2])  # label d has no positive: skipped
    assert result["seen_auroc"] == pytest.approx(seen, abs=1e-6)
    assert result["unseen_auroc"] == pytest.approx(unseen, abs=1e-6)
    assert result["harmonic_auroc"] == pytest.approx(2 * seen * unseen / (seen + unseen), abs=1e-6)


def test_wrong_shapes_are_refused():
    metric = MultiLabelMetrics(NAMES)
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        metric.update(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape"):
        metric.set_thresholds(torch.zeros(3))


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    """Under DDP (2 gloo processes, uneven shards) every value equals the single-process one."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.ddp.multilabel_sync import NAMES as SYNC_NAMES
    from tests.ddp.multilabel_sync import data

    out = tmp_path / "sync.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tests.ddp.multilabel_sync", str(out)], cwd=REPO, env=env, check=True, timeout=300)
    synced = json.loads(out.read_text())
    scores, targets = data()
    thresholds = choose_f1_thresholds(scores, targets)
    single = MultiLabelMetrics(SYNC_NAMES, thresholds=thresholds)
    single.update(scores, targets)
    expected = single.compute()
    assert synced["rows"] == len(scores)
    assert synced["thresholds"] == pytest.approx(thresholds.tolist())
    assert synced["values"] == pytest.approx(expected)
