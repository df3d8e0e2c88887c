"""ClassificationMetrics must agree with scikit-learn (or a naive loop), incl. on absent classes."""

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
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)
from torchmetrics.utilities.data import dim_zero_sum

from medmetric.lightning_modules.metrics import ClassificationMetrics

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


def _naive_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Guo et al. 2017, one bin at a time: sum_b |B_b|/N * |acc(B_b) - conf(B_b)|."""
    n, ece = len(confidence), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        in_bin = [
            i for i in range(n) if lo < confidence[i] <= hi or (b == 0 and confidence[i] == 0)
        ]
        if in_bin:
            acc = sum(bool(correct[i]) for i in in_bin) / len(in_bin)
            conf = sum(float(confidence[i]) for i in in_bin) / len(in_bin)
            ece += len(in_bin) / n * abs(acc - conf)
    return ece


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
        precisions, _, f1s, _ = precision_recall_fscore_support(
            y, pred, average=None, labels=list(range(C)), zero_division=0
        )
    present = np.unique(y)
    in_either = set(present) | set(np.unique(pred))
    for c, name in enumerate(NAMES):
        ref[f"recall/{name}"] = recalls[c] if c in present else math.nan
        # NaN only where scikit-learn has nothing to score (no support, no predictions)
        ref[f"precision/{name}"] = precisions[c] if c in in_either else math.nan
        ref[f"f1/{name}"] = f1s[c] if c in in_either else math.nan
        ref[f"auroc/{name}"] = (
            roc_auc_score(y == c, probs[:, c]) if c in present and len(present) >= 2 else math.nan
        )
    ref["macro_auroc"] = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    ref["ece"] = _naive_ece(probs[np.arange(len(y)), pred], pred == y)
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

    assert list(got)[:5] == ["balanced_accuracy", "macro_f1", "accuracy", "macro_auroc", "ece"]
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
    # predicted but absent: precision and F1 are 0 (scikit-learn); neither: NaN
    assert got[f"precision/{NAMES[absent]}"] == 0.0 and got[f"f1/{NAMES[absent]}"] == 0.0
    assert math.isnan(got[f"precision/{NAMES[unseen]}"]) and math.isnan(got[f"f1/{NAMES[unseen]}"])
    assert math.isnan(got[f"auroc/{NAMES[absent]}"]) and math.isnan(got[f"auroc/{NAMES[unseen]}"])
    present_auroc = [got[f"auroc/{NAMES[c]}"] for c in present]
    assert got["macro_auroc"] == pytest.approx(float(np.mean(present_auroc)), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(
        float(np.nanmean([got[f"f1/{n}"] for n in NAMES])), abs=1e-12
    )
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
    assert all(math.isnan(got[f"auroc/{n}"]) for n in NAMES)  # no negatives for BCC either
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
    m = ClassificationMetrics(["a", "b", "c"], train_counts=[500, 50, 5], ece_bins=3)
    m.update(probs.log(), target)

    # Confusion matrix (rows = true): [[2, 1, 0], [0, 1, 1], [0, 0, 1]].
    assert m.confusion_matrix().tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m.confusion_matrix().dtype == torch.long
    got = m.compute()
    # Recall 2/3, 1/2, 1 -> balanced accuracy 13/18; accuracy 4/6.
    # F1 = 2TP / (2TP + FP + FN): 4/5, 2/4, 2/3 -> macro 59/90.
    # OvR AUROC: a: every positive (.7 .6 .3) beats every negative (.1 .2 .1) -> 1;
    #   b: .8 beats all 4 negatives (.2 .3 .5 .3), .35 beats 3 of 4 -> 7/8; c: .6 beats all -> 1.
    # Precision TP / predicted: 2/2, 1/2, 1/2.
    # ECE, 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1]; confidence (max prob) and correct:
    #   .7 y, .6 y, .5 n, .8 y, .45 n, .6 y -> bin 2: {.6 y, .5 n, .45 n, .6 y}, bin 3: {.7 y, .8 y}
    #   ECE = (|2 - 2.15| + |2 - 1.5|) / 6 = 13/120.
    # Shot groups (train counts 500, 50, 5): many {a}, medium {b}, few {c}.
    expected = {
        "balanced_accuracy": 13 / 18,
        "macro_f1": 59 / 90,
        "accuracy": 4 / 6,
        "macro_auroc": (1 + 7 / 8 + 1) / 3,
        "ece": 13 / 120,
        "many_shot_accuracy": 2 / 3,
        "medium_shot_accuracy": 1 / 2,
        "few_shot_accuracy": 1.0,
        "recall/a": 2 / 3,
        "recall/b": 1 / 2,
        "recall/c": 1.0,
        "precision/a": 1.0,
        "precision/b": 1 / 2,
        "precision/c": 1 / 2,
        "f1/a": 4 / 5,
        "f1/b": 2 / 4,
        "f1/c": 2 / 3,
        "auroc/a": 1.0,
        "auroc/b": 7 / 8,
        "auroc/c": 1.0,
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


def test_precision_f1_for_a_present_class_never_predicted():
    logits, target = _imbalanced_batch(50, n=1500)
    never = 2  # present in the targets, never predicted
    logits[:, never] -= 100.0
    assert (target == never).any() and not (logits.argmax(1) == never).any()
    m = ClassificationMetrics(NAMES)
    m.update(logits, target)
    got = m.compute()
    _assert_matches(got, _sklearn_reference(logits, target))
    assert got[f"precision/{NAMES[never]}"] == got[f"f1/{NAMES[never]}"] == 0.0
    assert got[f"recall/{NAMES[never]}"] == 0.0


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_matches_naive_loop(bins):
    logits, target = _imbalanced_batch(60, n=2000)
    logits = logits * 2  # overconfident
    m = ClassificationMetrics(NAMES, ece_bins=bins)
    for lo, tg in zip(logits.split(333), target.split(333), strict=True):
        m.update(lo, tg)
    probs, pred = _probs(logits), logits.argmax(1).numpy()
    conf, correct = probs[np.arange(len(pred)), pred], pred == target.numpy()
    assert m.compute()["ece"] == pytest.approx(_naive_ece(conf, correct, bins), abs=1e-12)
    if bins == 1:  # one bin: |accuracy - mean confidence|
        assert m.compute()["ece"] == pytest.approx(abs(correct.mean() - conf.mean()), abs=1e-12)


def test_ece_perfectly_calibrated_and_state_is_sum_reduced():
    # Every sample has confidence 0.75 and 3 of each 4 are right: ECE 0.
    p = torch.tensor([0.75, 0.25 / 2, 0.25 / 2]).log()
    logits = p.repeat(8, 1)
    target = torch.tensor([0, 0, 0, 1, 0, 0, 0, 2])
    m = ClassificationMetrics(["a", "b", "c"])
    m.update(logits, target)
    assert m.compute()["ece"] == pytest.approx(0.0, abs=1e-7)
    calibration = m.metrics["calibration"]
    assert calibration.count.sum() == 8 and calibration.correct.sum() == 6
    for state in ("count", "correct", "confidence"):
        assert calibration._reductions[state] is dim_zero_sum


def test_ece_is_exact_when_shards_are_summed():
    """What DDP sync does to the sum-reduced states: adding shard states = seeing all data."""
    logits, target = _imbalanced_batch(80, n=1200)
    whole = ClassificationMetrics(NAMES)
    whole.update(logits, target)
    shards = [ClassificationMetrics(NAMES) for _ in range(3)]
    for shard, lo, tg in zip(shards, logits.tensor_split(3), target.tensor_split(3), strict=True):
        shard.update(lo, tg)
    merged = ClassificationMetrics(NAMES)
    merged.update(logits[:1], target[:1])  # mark as updated; states overwritten below
    for state in ("count", "correct", "confidence"):
        setattr(
            merged.metrics["calibration"],
            state,
            sum(getattr(s.metrics["calibration"], state) for s in shards),
        )
    assert merged.metrics["calibration"].compute().item() == pytest.approx(
        whole.compute()["ece"], abs=1e-12
    )


def _naive_shot_accuracy(y, pred, counts, group, many=100, few=20):
    in_group = {
        "many": lambda n: n > many,
        "medium": lambda n: few <= n <= many,
        "few": lambda n: n < few,
    }[group]
    recalls = []
    for c, n in enumerate(counts):
        rows = [i for i in range(len(y)) if y[i] == c]
        if in_group(n) and rows:
            recalls.append(sum(pred[i] == c for i in rows) / len(rows))
    return sum(recalls) / len(recalls) if recalls else math.nan


def test_shot_groups_thresholds_hand_computed():
    # Train counts at the OLTR boundaries: > 100 many, [20, 100] medium, < 20 few.
    counts = [101, 100, 20, 19, 0, 1000, 20]
    m = ClassificationMetrics(NAMES, train_counts=counts)
    assert m.shot_groups() == {"many": [0, 5], "medium": [1, 2, 6], "few": [3, 4]}
    # Per-class recall 1/2, 1, 0, 1/4, -, 1, 1/3 (class 4 absent from the targets).
    target = torch.tensor([0, 0, 1, 2, 3, 3, 3, 3, 5, 6, 6, 6])
    pred = torch.tensor([0, 1, 1, 0, 3, 4, 4, 0, 5, 6, 0, 0])
    m.update(torch.nn.functional.one_hot(pred, C).float() * 5, target)
    got = m.compute()
    assert got["many_shot_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["medium_shot_accuracy"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert got["few_shot_accuracy"] == pytest.approx(1 / 4)  # class 4 absent: left out


def test_shot_groups_match_naive_loop_and_empty_group_is_nan():
    logits, target = _imbalanced_batch(70, n=1500, classes=[0, 1, 2, 4, 5, 6])  # 3 absent
    counts = [300, 2000, 60, 10, 150, 5, 40]
    m = ClassificationMetrics(NAMES, train_counts=torch.tensor(counts))
    m.update(logits, target)
    got = m.compute()
    y, pred = target.tolist(), logits.argmax(1).tolist()
    for group in ("many", "medium", "few"):
        assert got[f"{group}_shot_accuracy"] == pytest.approx(
            _naive_shot_accuracy(y, pred, counts, group), abs=1e-12
        )
    # custom thresholds; nothing is "few" below 1
    m = ClassificationMetrics(
        NAMES, train_counts=counts, many_shot_threshold=1000, few_shot_threshold=1
    )
    m.update(logits, target)
    got = m.compute()
    assert math.isnan(got["few_shot_accuracy"])
    assert got["many_shot_accuracy"] == pytest.approx(got["recall/NV"])
    assert got["medium_shot_accuracy"] == pytest.approx(
        _naive_shot_accuracy(y, pred, counts, "medium", many=1000, few=1), abs=1e-12
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute before update
        assert "many_shot_accuracy" not in ClassificationMetrics(NAMES).compute()


def test_extended_input_validation():
    with pytest.raises(ValueError):
        ClassificationMetrics(NAMES, train_counts=[1, 2, 3])
    with pytest.raises(ValueError):
        ClassificationMetrics(NAMES, train_counts=[1, 2, 3, 4, 5, 6, -7])
    with pytest.raises(ValueError):
        ClassificationMetrics(NAMES, many_shot_threshold=10, few_shot_threshold=20)
    with pytest.raises(ValueError):
        ClassificationMetrics(NAMES, ece_bins=0)
