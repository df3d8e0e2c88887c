"""Tests for medmetric.datamodules.samplers: batch structure, coverage, determinism, DDP sharding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from medmetric.datamodules.samplers import (
    SAMPLERS,
    ClassBalancedBatchSampler,
    MPerClassBatchSampler,
)


def imbalanced_labels(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``counts[c]`` samples of class ``c``."""
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(labels)


def batches(sampler) -> list[list[int]]:
    return [list(b) for b in sampler]


# ---------------------------------------------------------------- MPerClass structure


def test_m_per_class_batch_composition():
    # Non-contiguous class ids; class 50 is rare (2 < M images).
    labels = imbalanced_labels({3: 200, 7: 60, 11: 25, 20: 9, 50: 2})
    m, bs = 4, 12
    sampler = MPerClassBatchSampler(labels, m_per_class=m, batch_size=bs, seed=1)
    assert len(sampler) == len(labels) // bs
    out = batches(sampler)
    assert len(out) == len(sampler)
    for batch in out:
        assert len(batch) == bs
        assert all(isinstance(i, int) for i in batch)
        counts = Counter(labels[batch].tolist())
        assert len(counts) == bs // m  # P distinct classes
        assert set(counts.values()) == {m}  # exactly M each
        for c in counts:
            idx = [i for i in batch if labels[i] == c]
            if (labels == c).sum() >= m:
                assert len(set(idx)) == m  # distinct images for common classes


def test_m_per_class_classes_drawn_uniformly():
    labels = imbalanced_labels({0: 500, 1: 50, 2: 5, 3: 1})
    sampler = MPerClassBatchSampler(labels, m_per_class=2, batch_size=4, num_batches=2000)
    counts = Counter()
    for batch in sampler:
        counts.update(set(labels[batch].tolist()))
    # Each class is in a batch with prob P/K = 1/2.
    for c in range(4):
        assert abs(counts[c] / 2000 - 0.5) < 0.05


def test_rare_classes_drawn_with_replacement():
    labels = imbalanced_labels({0: 100, 1: 100, 2: 1, 3: 2})
    m = 4
    sampler = MPerClassBatchSampler(labels, m_per_class=m, batch_size=8, num_batches=200)
    seen_rare = {2: 0, 3: 0}
    for batch in sampler:
        for c in seen_rare:
            idx = [i for i in batch if labels[i] == c]
            if idx:
                seen_rare[c] += 1
                assert len(idx) == m
                assert set(idx) <= set(np.flatnonzero(labels == c).tolist())
                assert len(set(idx)) < m  # necessarily repeats
    assert seen_rare[2] > 0 and seen_rare[3] > 0
    # The 2-image class uses both images somewhere.
    used = {i for b in sampler for i in b if labels[i] == 3}
    assert used == set(np.flatnonzero(labels == 3).tolist())


def test_common_class_images_used_evenly_over_epoch():
    # Two classes, P = 2: every batch uses both, so each class is used n_batches * M times.
    labels = imbalanced_labels({0: 37, 1: 10})
    m, n_batches = 5, 30
    sampler = MPerClassBatchSampler(labels, m_per_class=m, batch_size=2 * m, num_batches=n_batches)
    usage = Counter(i for b in sampler for i in b)
    for c in (0, 1):
        members = np.flatnonzero(labels == c)
        total = n_batches * m
        k = total // len(members)
        per_image = [usage[i] for i in members]
        assert sum(per_image) == total
        assert set(per_image) <= {k, k + 1}, (c, per_image)


def test_m_per_class_even_coverage_when_classes_subsampled():
    # With P < K, each class's images are still used k or k+1 times given its use count.
    labels = imbalanced_labels({0: 13, 1: 17, 2: 8, 3: 30})
    m = 4
    sampler = MPerClassBatchSampler(labels, m_per_class=m, batch_size=8, num_batches=100, seed=3)
    usage = Counter(i for b in sampler for i in b)
    for c in range(4):
        members = np.flatnonzero(labels == c)
        per_image = [usage[i] for i in members]
        k = sum(per_image) // len(members)
        assert sum(per_image) % m == 0
        assert set(per_image) <= {k, k + 1}


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_determinism_and_epochs(name):
    labels = imbalanced_labels({0: 300, 1: 40, 2: 12, 5: 3})
    kwargs = {"m_per_class": 2} if name == "m_per_class" else {}
    make = lambda seed=0: SAMPLERS[name](labels, batch_size=8, seed=seed, **kwargs)  # noqa: E731

    a, b = make(), make()
    np.random.seed(123)
    torch.manual_seed(123)
    first = batches(a)
    np.random.seed(999)
    torch.manual_seed(999)
    assert batches(b) == first
    assert batches(a) == first  # re-iterating the same epoch is stable

    a.set_epoch(1)
    second = batches(a)
    assert second != first
    b.set_epoch(1)
    np.random.seed(7)
    torch.manual_seed(7)
    assert batches(b) == second
    a.set_epoch(0)
    assert batches(a) == first

    assert batches(make(seed=1)) != first


def test_labels_as_list_array_tensor_agree():
    base = imbalanced_labels({0: 50, 4: 20, 9: 7})
    outs = [
        batches(MPerClassBatchSampler(x, m_per_class=3, batch_size=6, seed=5))
        for x in (base.tolist(), base, torch.from_numpy(base))
    ]
    assert outs[0] == outs[1] == outs[2]


# ---------------------------------------------------------------- DDP sharding


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_rank_sharding(name):
    labels = imbalanced_labels({0: 400, 1: 90, 2: 20, 3: 5})
    kwargs = {"m_per_class": 4} if name == "m_per_class" else {}
    common = dict(batch_size=8, seed=11, num_replicas=2, **kwargs)
    r0 = SAMPLERS[name](labels, rank=0, **common)
    r1 = SAMPLERS[name](labels, rank=1, **common)
    for epoch in (0, 3):
        r0.set_epoch(epoch)
        r1.set_epoch(epoch)
        b0, b1 = batches(r0), batches(r1)
        # Default: len(labels) // batch_size global batches split over 2 ranks.
        assert len(b0) == len(b1) == len(r0) == len(r1) == (len(labels) // 8) // 2
        # Disjoint batches (as positions in the one global plan) ...
        plan = r0.global_plan().tolist()
        assert plan == r1.global_plan().tolist()
        assert len(plan) == 2 * len(b0)
        # ... whose interleaving is exactly the global plan.
        interleaved = [b for pair in zip(b0, b1, strict=True) for b in pair]
        assert interleaved == plan
        assert {tuple(b) for b in b0}.isdisjoint({tuple(b) for b in b1})
    if name == "m_per_class":
        for batch in b0 + b1:
            assert set(Counter(labels[batch].tolist()).values()) == {4}


def test_num_batches_is_per_rank_and_min_one():
    labels = imbalanced_labels({0: 10, 1: 10})
    s = MPerClassBatchSampler(labels, 2, 4, num_batches=7, num_replicas=3, rank=2)
    assert len(s) == 7 and len(batches(s)) == 7
    assert s.global_plan().shape == (21, 4)
    tiny = ClassBalancedBatchSampler([0, 1, 1], batch_size=16, num_replicas=4, rank=3)
    assert len(tiny) == 1 and len(batches(tiny)) == 1 and len(batches(tiny)[0]) == 16


# ---------------------------------------------------------------- class-balanced


def test_class_balanced_frequencies_near_uniform():
    counts = {0: 10000, 1: 1000, 2: 100}  # 100:10:1
    labels = imbalanced_labels(counts)
    bs, n_batches = 64, 300
    sampler = ClassBalancedBatchSampler(labels, batch_size=bs, num_batches=n_batches, seed=2)
    drawn = np.concatenate([labels[b] for b in sampler])
    assert drawn.size == bs * n_batches

    # Naive reference: P(class c) = sum over images i of c of P(draw i),
    # P(draw i) = (1 / K) * (1 / n_{class(i)}).
    k = len(counts)
    per_image = np.array([1.0 / k / counts[c] for c in labels])
    expected_p = np.array([per_image[labels == c].sum() for c in sorted(counts)])
    np.testing.assert_allclose(expected_p, 1 / 3)

    observed = np.array([(drawn == c).sum() for c in sorted(counts)])
    expected = expected_p * drawn.size
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 13.8, (observed, expected, chi2)  # p = 0.001 for 2 dof
    # Far from the natural (imbalanced) frequencies.
    assert observed[2] / drawn.size > 0.3


def test_class_balanced_covers_images_within_class():
    labels = imbalanced_labels({0: 1000, 1: 5})
    sampler = ClassBalancedBatchSampler(labels, batch_size=32, num_batches=50)
    used = Counter(i for b in sampler for i in b if labels[i] == 1)
    assert set(used) == set(np.flatnonzero(labels == 1).tolist())
    freq = np.array(list(used.values())) / sum(used.values())
    assert np.all(np.abs(freq - 0.2) < 0.06)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (
            lambda: MPerClassBatchSampler([0, 1] * 50, m_per_class=4, batch_size=30),
            ["batch_size=30", "m_per_class=4", "28", "32"],
        ),
        (
            lambda: MPerClassBatchSampler([0, 1, 2] * 10, m_per_class=4, batch_size=16),
            ["batch_size=16", "4 classes", "only 3 classes", "<= 12"],
        ),
        (lambda: MPerClassBatchSampler([0, 1], m_per_class=0, batch_size=4), ["m_per_class"]),
        (lambda: MPerClassBatchSampler([], m_per_class=2, batch_size=4), ["labels", "empty"]),
        (lambda: ClassBalancedBatchSampler([], batch_size=4), ["labels", "empty"]),
        (lambda: ClassBalancedBatchSampler([0, 1], batch_size=0), ["batch_size"]),
        (
            lambda: ClassBalancedBatchSampler([0, 1], batch_size=2, num_replicas=0),
            ["num_replicas"],
        ),
        (
            lambda: ClassBalancedBatchSampler([0, 1], batch_size=2, num_replicas=2, rank=2),
            ["rank=2", "num_replicas=2"],
        ),
        (lambda: ClassBalancedBatchSampler([0, 1], batch_size=2, rank=-1), ["rank"]),
        (lambda: ClassBalancedBatchSampler([0, 1], batch_size=2, num_batches=0), ["num_batches"]),
        (lambda: ClassBalancedBatchSampler([[0, 1]], batch_size=2), ["labels", "1-D"]),
        (lambda: ClassBalancedBatchSampler([0.5, 1.0], batch_size=2), ["labels", "integer"]),
    ],
)
def test_validation_messages(make, needles):
    with pytest.raises(ValueError) as err:
        make()
    for needle in needles:
        assert needle in str(err.value)


# ---------------------------------------------------------------- integration / speed


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_dataloader_batch_sampler(name):
    labels = torch.tensor(imbalanced_labels({0: 60, 1: 20, 2: 6}))
    x = torch.arange(len(labels), dtype=torch.float32).unsqueeze(1)
    kwargs = {"m_per_class": 3} if name == "m_per_class" else {}
    sampler = SAMPLERS[name](labels, batch_size=6, seed=4, **kwargs)
    loader = DataLoader(TensorDataset(x, labels), batch_sampler=sampler)
    assert len(loader) == len(sampler) == len(labels) // 6
    got = list(loader)
    assert len(got) == len(sampler)
    for (xb, yb), idx in zip(got, sampler, strict=True):
        assert xb.shape == (6, 1)
        assert xb[:, 0].long().tolist() == idx
        assert yb.tolist() == labels[idx].tolist()


# ---------------------------------------------------------------- square-root and progressive


def chi_square(drawn: np.ndarray, expected_p: np.ndarray) -> float:
    observed = np.array([(drawn == c).sum() for c in range(len(expected_p))])
    expected = expected_p * drawn.size
    return float(((observed - expected) ** 2 / expected).sum())


def kang_probabilities(counts: list[int], q: float) -> np.ndarray:
    """Kang et al. 2020, eq. 1: p_j = n_j^q / sum_i n_i^q, written as a plain loop."""
    total = sum(n**q for n in counts)
    return np.array([n**q / total for n in counts])


def test_square_root_sampler_follows_the_published_probabilities():
    counts = [10000, 1000, 100]
    labels = imbalanced_labels(dict(enumerate(counts)))
    sampler = SAMPLERS["sqrt"](labels, batch_size=64, num_batches=300, seed=3)
    drawn = np.concatenate([labels[b] for b in sampler])
    assert chi_square(drawn, kang_probabilities(counts, 0.5)) < 13.8  # p = 0.001, 2 dof


@pytest.mark.parametrize("epoch", [0, 2, 4])
def test_progressive_sampler_moves_from_instance_to_class_balanced(epoch):
    counts = [10000, 1000, 100]
    labels = imbalanced_labels(dict(enumerate(counts)))
    sampler = SAMPLERS["progressive"](labels, batch_size=64, num_batches=300, seed=4, total_epochs=4)
    sampler.set_epoch(epoch)
    drawn = np.concatenate([labels[b] for b in sampler])
    t = epoch / 4  # Kang et al. 2020, eq. 2
    expected = (1 - t) * kang_probabilities(counts, 1.0) + t * kang_probabilities(counts, 0.0)
    assert chi_square(drawn, expected) < 13.8
