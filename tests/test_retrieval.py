"""retrieval_metrics / RetrievalMetrics against pytorch-metric-learning, a naive loop and by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch.nn import functional as F

from medmetric.lightning_modules.metrics import RetrievalMetrics, retrieval_metrics

KS = (1, 2, 5, 10)


def _embeddings(seed: int, n: int, dim: int = 16, classes: int = 6, dtype=torch.float32):
    """Imbalanced labels (largest class ~10x the smallest) with some class structure."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.1 ** (c / (classes - 1)) for c in range(classes)])
    labels = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    centres = torch.randn(classes, dim, generator=g)
    emb = centres[labels] * 0.6 + torch.randn(n, dim, generator=g)
    return emb.to(dtype), labels


def _scores(query, reference, distance):
    """The float32 scores PML ranks by; larger = nearer."""
    if distance == "cosine":
        return F.normalize(query, dim=1) @ F.normalize(reference, dim=1).T
    return -torch.cdist(query, reference)


def _assert_no_ties(query, reference, reference_labels, distance, exclude_self):
    """Exactly tied scores are ordered arbitrarily by torch.topk (ours and PML's alike).

    Only ties between references of different labels can change a metric.
    """
    s = _scores(query.float(), reference.float(), distance)
    if exclude_self:
        s[torch.arange(len(query)), torch.arange(len(query))] = -math.inf
    s, order = s.sort(dim=1, descending=True)
    # only the first max(R) + max(k) neighbours are read (ties further down do not count)
    keep = min(
        s.shape[1] - int(exclude_self), int(torch.bincount(reference_labels).max()) + max(KS)
    )
    s, nbr_labels = s[:, :keep], reference_labels[order[:, :keep]]
    tied = (s[:, 1:] == s[:, :-1]) & (nbr_labels[:, 1:] != nbr_labels[:, :-1])
    assert not tied.any(), "test data has label-mixed score ties: pick another seed"


def _pml(
    query,
    query_labels,
    reference,
    reference_labels,
    distance,
    avg_of_avgs,
    ref_includes_query=False,
):
    # No faiss here: AccuracyCalculator's default knn_func (FaissKNN) fails with
    # NameError, so give it PML's exact torch k-NN with the matching distance. PML's
    # LpDistance normalises by default; Euclidean on raw embeddings needs it off.
    dist = CosineSimilarity() if distance == "cosine" else LpDistance(normalize_embeddings=False)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",  # MAP@R needs every query's R neighbours
        avg_of_avgs=avg_of_avgs,
        knn_func=CustomKNN(dist),
        device=torch.device("cpu"),
    )
    if reference is None:
        return calc.get_accuracy(query, query_labels)
    return calc.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)


def _naive(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ks=KS,
    distance="cosine",
    per_class=False,
    exclude_self=None,
):
    """One query at a time, plain Python: sort the references, read off the metrics."""
    same = reference is None
    if same:
        reference, reference_labels = query, query_labels
    exclude_self = same if exclude_self is None else exclude_self
    q, r = query.double().tolist(), reference.double().tolist()
    ql, rl = query_labels.tolist(), reference_labels.tolist()

    def score(a, b):
        if distance == "cosine":
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))
        return -math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))

    per_query: dict[str, list[float]] = {}
    classes: list[int] = []
    for i in range(len(q)):
        candidates = [j for j in range(len(r)) if not (exclude_self and j == i)]
        ranked = sorted(candidates, key=lambda j: -score(q[i], r[j]))
        rel = [rl[j] == ql[i] for j in ranked]
        big_r = sum(rel)
        if big_r == 0:
            continue  # nothing to retrieve: not scored
        classes.append(ql[i])
        per_query.setdefault("precision_at_1", []).append(float(rel[0]))
        for k in ks:
            per_query.setdefault(f"recall_at_{k}", []).append(float(any(rel[:k])))
        hits, ap = 0, 0.0
        for pos in range(big_r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        per_query.setdefault("map_at_r", []).append(ap / big_r)
    out = {}
    for name, values in per_query.items():
        if per_class:
            means = []
            for c in sorted(set(classes)):
                vals = [v for v, cc in zip(values, classes, strict=True) if cc == c]
                means.append(sum(vals) / len(vals))
            out[name] = sum(means) / len(means)
        else:
            out[name] = sum(values) / len(values)
    return out


def _assert_close(got, ref, tol=1e-12):
    assert set(ref) <= set(got)
    for key, value in ref.items():
        assert isinstance(got[key], float), key
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=tol), key


# ------------------------------------------------------------------ vs pytorch-metric-learning


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("per_class_average", [False, True])
def test_leave_one_out_matches_pml(distance, per_class_average):
    emb, labels = _embeddings(0, 300)
    _assert_no_ties(emb, emb, labels, distance, exclude_self=True)
    got = retrieval_metrics(
        emb,
        labels,
        distance=distance,
        per_class_average=per_class_average,
        chunk_size=64,
        k_values=KS,
    )
    ref = _pml(emb, labels, None, None, distance, per_class_average)
    assert got["precision_at_1"] == ref["precision_at_1"]
    assert got["recall_at_1"] == ref["precision_at_1"]
    assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-12)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("per_class_average", [False, True])
def test_separate_reference_matches_pml(distance, per_class_average):
    query, query_labels = _embeddings(2, 200)
    reference, reference_labels = _embeddings(102, 450)
    # a query class missing from the reference set: those queries are left out (PML: "lone")
    reference, reference_labels = (
        reference[reference_labels != 4],
        reference_labels[reference_labels != 4],
    )
    assert (query_labels == 4).any()
    _assert_no_ties(query, reference, reference_labels, distance, exclude_self=False)
    got = retrieval_metrics(
        query, query_labels, reference, reference_labels, distance=distance,
        per_class_average=per_class_average, chunk_size=50, k_values=KS,
    )  # fmt: skip
    ref = _pml(query, query_labels, reference, reference_labels, distance, per_class_average)
    assert got["precision_at_1"] == ref["precision_at_1"]
    assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-12)


def test_exclude_self_with_reference_containing_the_queries_matches_pml():
    """PML's ref_includes_query: the first len(query) references are the queries."""
    emb, labels = _embeddings(3, 450)
    query, query_labels = emb[:150], labels[:150]
    _assert_no_ties(query, emb, labels, "cosine", exclude_self=True)
    got = retrieval_metrics(query, query_labels, emb, labels, exclude_self=True, chunk_size=32)
    ref = _pml(query, query_labels, emb, labels, "cosine", False, ref_includes_query=True)
    assert got["precision_at_1"] == ref["precision_at_1"]
    assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-12)
    with pytest.raises(ValueError):  # query i must be reference i
        retrieval_metrics(query, query_labels.roll(1), emb, labels, exclude_self=True)


# ------------------------------------------------------------------ vs a naive loop


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("per_class_average", [False, True])
def test_leave_one_out_matches_naive_loop(distance, per_class_average):
    emb, labels = _embeddings(4, 150, dtype=torch.float64)
    got = retrieval_metrics(
        emb,
        labels,
        k_values=KS,
        distance=distance,
        per_class_average=per_class_average,
        chunk_size=16,
    )
    _assert_close(got, _naive(emb, labels, distance=distance, per_class=per_class_average))
    assert list(got) == [
        "precision_at_1",
        "recall_at_1",
        "recall_at_2",
        "recall_at_5",
        "recall_at_10",
        "map_at_r",
    ]


@pytest.mark.parametrize("per_class_average", [False, True])
def test_separate_reference_matches_naive_loop(per_class_average):
    query, query_labels = _embeddings(5, 80, dtype=torch.float64)
    reference, reference_labels = _embeddings(6, 170, dtype=torch.float64)
    ks = (1, 3, 20, 1000)  # k beyond the reference set: every scored query has a hit
    got = retrieval_metrics(
        query,
        query_labels,
        reference,
        reference_labels,
        k_values=ks,
        per_class_average=per_class_average,
        chunk_size=7,
    )
    _assert_close(
        got,
        _naive(
            query, query_labels, reference, reference_labels, ks=ks, per_class=per_class_average
        ),
    )
    assert got["recall_at_1000"] == 1.0
    assert got["recall_at_1"] <= got["recall_at_3"] <= got["recall_at_20"]


def test_chunk_size_does_not_change_the_result():
    emb, labels = _embeddings(7, 300, dtype=torch.float64)
    whole = retrieval_metrics(emb, labels, chunk_size=10_000)
    for chunk in (1, 13, 64):
        assert retrieval_metrics(emb, labels, chunk_size=chunk) == pytest.approx(whole, abs=1e-12)


# ------------------------------------------------------------------ by hand


def test_hand_computed_separate_reference():
    # 1-D points, Euclidean. References at 1..5 labelled A B A B A (A = 0, B = 1).
    reference = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    reference_labels = torch.tensor([0, 1, 0, 1, 0])
    # Queries: 0.0 (A), 0.9 (A): neighbours A B A B A, R = 3 -> AP = (1 + 2/3)/3 = 5/9, hit@1.
    #          2.9 (B): neighbours 3(A) 2(B) 4(B) 1(A) 5(A), R = 2 -> AP = (1/2)/2 = 1/4, miss@1,
    #                   hit@2.  7.0 (C = 2): no reference of its class -> not scored.
    query = torch.tensor([[0.0], [0.9], [2.9], [7.0]])
    query_labels = torch.tensor([0, 0, 1, 2])
    args = (query, query_labels, reference, reference_labels)
    got = retrieval_metrics(*args, k_values=(1, 2), distance="euclidean")
    _assert_close(
        got,
        {
            "precision_at_1": 2 / 3,
            "recall_at_1": 2 / 3,
            "recall_at_2": 1.0,
            "map_at_r": (5 / 9 + 5 / 9 + 1 / 4) / 3,
        },
    )
    got = retrieval_metrics(*args, k_values=(1, 2), distance="euclidean", per_class_average=True)
    _assert_close(
        got,
        {
            "precision_at_1": 1 / 2,
            "recall_at_1": 1 / 2,
            "recall_at_2": 1.0,
            "map_at_r": (5 / 9 + 1 / 4) / 2,
        },
    )


def test_hand_computed_leave_one_out():
    # 1-D points 0, 1, 2.5, 10 labelled A A B B (euclidean). Leave-one-out neighbours:
    #   0 (A): 1(A) 2.5(B) 10(B), R = 1 -> AP 1;   1 (A): 0(A) ...  -> AP 1
    #   2.5 (B): 1(A) 0(A) 10(B), R = 1 -> AP 0, hit only at 3;   10 (B): 2.5(B) -> AP 1
    emb = torch.tensor([[0.0], [1.0], [2.5], [10.0]])
    labels = torch.tensor([0, 0, 1, 1])
    got = retrieval_metrics(emb, labels, k_values=(1, 2, 3), distance="euclidean")
    _assert_close(
        got, {"precision_at_1": 3 / 4, "recall_at_2": 3 / 4, "recall_at_3": 1.0, "map_at_r": 3 / 4}
    )


def test_lone_queries_and_nan():
    emb, labels = _embeddings(8, 60, dtype=torch.float64)
    labels[0] = 9  # a class of one: nothing to retrieve when it is left out
    got = retrieval_metrics(emb, labels)
    _assert_close(got, _naive(emb, labels, ks=(1, 5, 10)))
    assert got["precision_at_1"] * 59 == pytest.approx(
        round(got["precision_at_1"] * 59)
    )  # 59 scored
    all_nan = retrieval_metrics(emb[:3], torch.tensor([0, 1, 2]))
    assert all(math.isnan(v) for v in all_nan.values())
    empty = retrieval_metrics(emb[:0], labels[:0])
    assert set(empty) == {
        "precision_at_1",
        "recall_at_1",
        "recall_at_5",
        "recall_at_10",
        "map_at_r",
    }


def test_input_validation():
    emb, labels = _embeddings(9, 20)
    with pytest.raises(ValueError):
        retrieval_metrics(emb, labels, distance="manhattan")
    with pytest.raises(ValueError):
        retrieval_metrics(emb, labels, k_values=(0, 5))
    with pytest.raises(ValueError):
        retrieval_metrics(emb, labels, reference=emb)  # labels missing
    with pytest.raises(ValueError):
        retrieval_metrics(emb, labels[:-1])
    with pytest.raises(ValueError):
        retrieval_metrics(emb, labels, emb[:, :3], labels)
    with pytest.raises(ValueError):
        RetrievalMetrics(distance="dot")


# ------------------------------------------------------------------ RetrievalMetrics


def test_retrieval_metric_deduplicates_padded_indices():
    emb, labels = _embeddings(10, 203, dtype=torch.float64)
    expected = retrieval_metrics(emb, labels, chunk_size=50)
    # Two "ranks" of a DistributedSampler(shuffle=True): 203 samples padded to 2 x 102,
    # the padding repeating the first samples of the permutation.
    perm = torch.randperm(203, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([perm, perm[:1]])
    metric = RetrievalMetrics(chunk_size=50)
    for rank in range(2):
        idx = padded[rank::2]
        for batch in idx.split(32):
            metric.update(emb[batch], labels[batch], batch)
    assert sum(len(i) for i in metric.indices) == 204
    assert metric.compute() == pytest.approx(expected, abs=1e-12)

    # many repeats, mixed order: still the 203 unique samples
    metric.reset()
    for _ in range(3):
        metric.update(emb.flip(0), labels.flip(0), torch.arange(203).flip(0))
    metric.update(emb[:10], labels[:10], torch.arange(10))
    assert metric.compute() == pytest.approx(expected, abs=1e-12)


def test_retrieval_metric_options_and_errors():
    emb, labels = _embeddings(11, 120, dtype=torch.float64)
    metric = RetrievalMetrics(k_values=(1, 3), distance="euclidean", per_class_average=True)
    metric.update(emb, labels, torch.arange(120) + 1000)
    expected = retrieval_metrics(
        emb, labels, k_values=(1, 3), distance="euclidean", per_class_average=True
    )
    assert metric.compute() == pytest.approx(expected, abs=1e-12)

    metric = RetrievalMetrics()
    metric.update(emb[:5], labels[:5], torch.arange(5))
    metric.update(emb[:1], labels[:1] + 1, torch.arange(1))  # same index, other label
    with pytest.raises(ValueError):
        metric.compute()
    with pytest.raises(ValueError):
        metric.update(emb[:5], labels[:4], torch.arange(5))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute before update
        empty = RetrievalMetrics(k_values=(1, 5)).compute()
    assert set(empty) == {"precision_at_1", "recall_at_1", "recall_at_5", "map_at_r"}
    assert all(math.isnan(v) for v in empty.values())


def test_retrieval_metric_states_are_cat_reduced():
    metric = RetrievalMetrics()
    for state in ("embeddings", "labels", "indices"):
        assert metric._reductions[state].__name__ == "dim_zero_cat"
    half = torch.randn(8, 4).half()
    metric.update(half, torch.zeros(8, dtype=torch.long), torch.arange(8))
    assert metric.embeddings[0].dtype == torch.float32


def test_large_k_path_matches_pml_and_topk():
    """Classes of several hundred: the CPU path sorts the top-k with numpy (k >= 256)."""
    from medmetric.lightning_modules.metrics.retrieval import _top_k_indices

    emb, labels = _embeddings(12, 900, classes=3)
    assert torch.bincount(labels).max() > 300
    _assert_no_ties(emb, emb, labels, "cosine", exclude_self=True)
    for per_class_average in (False, True):
        got = retrieval_metrics(emb, labels, per_class_average=per_class_average, chunk_size=128)
        ref = _pml(emb, labels, None, None, "cosine", per_class_average)
        assert got["precision_at_1"] == ref["precision_at_1"]
        assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-12)

    scores = torch.randn(50, 2000, generator=torch.Generator().manual_seed(0))
    for k in (255, 256, 700, 2000):  # (random floats may tie: compare the scores picked)
        idx = _top_k_indices(scores.clone(), k)
        assert torch.equal(scores.gather(1, idx), scores.topk(k, dim=1).values)
        assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct columns
