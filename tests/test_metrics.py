"""ClassificationMetrics must agree with scikit-learn, including on absent classes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    recall_score,
    roc_auc_score,
)

from lightning_modules.metrics import ClassificationMetrics

C = 7
NAMES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
# ISIC-2018-like skew: the majority class is ~60x the rarest one.
PRIORS = torch.tensor([0.11, 0.67, 0.05, 0.03, 0.11, 0.012, 0.018])
TOL = 1e-6


def _imbalanced_batch(seed: int, n: int = 3000, classes: torch.Tensor | None = None):
    """Logits weakly informative of a heavily imbalanced target."""
    g = torch.Generator().manual_seed(seed)
    priors = PRIORS.clone()
    if classes is not None:  # restrict the targets to these classes
        mask = torch.zeros(C, dtype=torch.bool)
        mask[classes] = True
        priors[~mask] = 0
    target = torch.multinomial(priors / priors.sum(), n, replacement=True, generator=g)
    logits = torch.randn(n, C, generator=g) * 1.5
    logits[torch.arange(n), target] += 1.0
    return logits, target


def _probs(logits: torch.Tensor) -> np.ndarray:
    return logits.double().softmax(dim=1).numpy()


def _sklearn_reference(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    y = target.numpy()
    pred = logits.argmax(dim=1).numpy()
    probs = _probs(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        ref = {
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "macro_f1": f1_score(y, pred, average="macro", zero_division=0),
            "accuracy": accuracy_score(y, pred),
        }
        recalls = recall_score(y, pred, average=None, labels=list(range(C)), zero_division=0)
    present = np.unique(y)
    for c, name in enumerate(NAMES):
        ref[f"recall/{name}"] = recalls[c] if c in present else math.nan
    ref["macro_auroc"] = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    return ref


def _assert_matches(got: dict[str, float], ref: dict[str, float]) -> None:
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert isinstance(got[key], float), key
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=TOL), key


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_sklearn_on_imbalanced_data(seed):
    logits, target = _imbalanced_batch(seed)
    assert len(target.unique()) == C  # all classes present, so sklearn's macro OvR applies

    m = ClassificationMetrics(NAMES)
    m.update(logits, target)
    got = m.compute()

    assert list(got)[:4] == ["balanced_accuracy", "macro_f1", "accuracy", "macro_auroc"]
    _assert_matches(got, _sklearn_reference(logits, target))
    sk_auroc = roc_auc_score(
        target.numpy(), _probs(logits), multi_class="ovr", average="macro", labels=list(range(C))
    )
    assert got["macro_auroc"] == pytest.approx(sk_auroc, abs=TOL)


def test_batched_updates_equal_one_update():
    logits, target = _imbalanced_batch(10, n=1000)
    whole = ClassificationMetrics(NAMES)
    whole.update(logits, target)

    batched = ClassificationMetrics(NAMES)
    for lo, tg in zip(logits.split(77), target.split(77), strict=True):
        batched.update(lo, tg)

    assert torch.equal(batched.confusion_matrix(), whole.confusion_matrix())
    _assert_matches(batched.compute(), whole.compute())


def test_absent_class():
    absent, unseen = 3, 5  # both absent from the targets; `unseen` is never predicted either
    present = [c for c in range(C) if c not in (absent, unseen)]
    logits, target = _imbalanced_batch(20, n=2000, classes=present)
    logits[:50, absent] += 5.0  # make sure the absent class is predicted sometimes
    logits[:, unseen] -= 100.0
    pred = logits.argmax(dim=1)
    assert absent not in target.tolist() and unseen not in target.tolist()
    assert (pred == absent).any() and not (pred == unseen).any()

    m = ClassificationMetrics(NAMES)
    m.update(logits, target)
    got = m.compute()

    # The reference averages recall and AUROC over the five present classes only, and
    # macro F1 over six (class 3 is predicted, so its F1 of 0 counts; class 5 does not).
    _assert_matches(got, _sklearn_reference(logits, target))
    assert math.isnan(got[f"recall/{NAMES[absent]}"])
    assert math.isnan(got[f"recall/{NAMES[unseen]}"])
    all_labels_f1 = f1_score(
        target.numpy(), pred.numpy(), average="macro", labels=list(range(C)), zero_division=0
    )
    assert got["macro_f1"] == pytest.approx(all_labels_f1 * C / (C - 1), abs=TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy()), abs=TOL
        )
    assert m.confusion_matrix()[absent].sum() == 0


def test_auroc_nan_with_fewer_than_two_classes():
    m = ClassificationMetrics(NAMES)
    logits = torch.randn(10, C, generator=torch.Generator().manual_seed(0))
    m.update(logits, torch.full((10,), 2))
    got = m.compute()
    assert math.isnan(got["macro_auroc"])
    assert got["balanced_accuracy"] == got["recall/BCC"] == got["accuracy"]


def test_hand_computed_tiny_case():
    # Rows are the softmax probabilities (logits = log p); argmax = [0, 0, 1, 1, 2, 2].
    probs = torch.tensor(
        [
            [0.70, 0.20, 0.10],
            [0.60, 0.30, 0.10],
            [0.30, 0.50, 0.20],
            [0.10, 0.80, 0.10],
            [0.20, 0.35, 0.45],
            [0.10, 0.30, 0.60],
        ]
    )
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    m = ClassificationMetrics(["a", "b", "c"])
    m.update(probs.log(), target)

    # Confusion matrix (rows = true): [[2, 1, 0], [0, 1, 1], [0, 0, 1]].
    assert m.confusion_matrix().tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m.confusion_matrix().dtype == torch.long
    got = m.compute()
    # Recall 2/3, 1/2, 1 -> balanced accuracy 13/18; accuracy 4/6.
    # F1 = 2TP / (2TP + FP + FN): 4/5, 2/4, 2/3 -> macro 59/90.
    # OvR AUROC: a: every positive (.7 .6 .3) beats every negative (.1 .2 .1) -> 1;
    #   b: .8 beats all 4 negatives (.2 .3 .5 .3), .35 beats 3 of 4 -> 7/8; c: .6 beats all -> 1.
    expected = {
        "balanced_accuracy": 13 / 18,
        "macro_f1": 59 / 90,
        "accuracy": 4 / 6,
        "macro_auroc": (1 + 7 / 8 + 1) / 3,
        "recall/a": 2 / 3,
        "recall/b": 1 / 2,
        "recall/c": 1.0,
    }
    _assert_matches(got, expected)


def test_reset():
    m = ClassificationMetrics(NAMES)
    logits, target = _imbalanced_batch(30, n=500)
    m.update(torch.randn(200, C), torch.randint(0, C, (200,)))
    m.compute()
    m.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute before update
        assert m.confusion_matrix().sum() == 0
    m.update(logits, target)
    _assert_matches(m.compute(), _sklearn_reference(logits, target))


def test_empty_is_nan():
    m = ClassificationMetrics(NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute before update
        got = m.compute()
    assert all(math.isnan(v) for v in got.values())


def test_input_validation():
    with pytest.raises(ValueError):
        ClassificationMetrics(["only"])
    with pytest.raises(ValueError):
        ClassificationMetrics(["a", "a"])
    m = ClassificationMetrics(NAMES)
    with pytest.raises(ValueError):
        m.update(torch.randn(4, C - 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        m.update(torch.randn(4, C), torch.zeros(3, dtype=torch.long))


def test_is_a_submodule_whose_states_follow_the_module():
    parent = torch.nn.Module()
    parent.metrics = ClassificationMetrics(NAMES)
    assert any(isinstance(mod, ClassificationMetrics) for mod in parent.modules())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parent.to(device)
    assert parent.metrics.metrics["confmat"].confmat.device.type == device
    logits, target = _imbalanced_batch(40, n=300)
    parent.metrics.update(logits.to(device), target.to(device))
    _assert_matches(parent.metrics.compute(), _sklearn_reference(logits, target))
