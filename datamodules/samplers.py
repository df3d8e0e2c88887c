"""Seeded, DDP-aware batch samplers for class-imbalanced training.

Batch samplers, all ``torch.utils.data.Sampler`` objects that yield *lists of dataset
indices* and are meant for ``DataLoader(dataset, batch_sampler=...)``:

* :class:`MPerClassBatchSampler` (stage 1, metric learning): every batch holds ``P``
  distinct classes x ``M`` images each, so every anchor has positives in the batch,
  which contrastive / SupCon / triplet losses need.
* :class:`ClassBalancedBatchSampler` (stage 2, classifier re-training, "cRT" of Kang et
  al., ICLR 2020): every index is drawn by first picking a class uniformly, then an
  image uniformly within it, so the classifier sees all classes equally often.
* :class:`SquareRootBatchSampler` and :class:`ProgressiveBatchSampler`: the other class
  probabilities of Kang et al. (square-root; instance -> class-balanced over the epochs).

Why not ``DistributedSampler``: wrapping a batch sampler would break the per-batch
structure. Instead, for epoch ``e`` one RNG seeded from ``(seed, e)`` builds the whole
*global* plan of ``num_replicas * len(self)`` batches, and rank ``r`` takes batches
``r, r + num_replicas, ...``. Ranks therefore get disjoint batches of equal count from
one plan, and nothing depends on the global numpy / torch RNG state. Call
:meth:`set_epoch` every epoch (the framework does) to get a fresh plan.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

__all__ = [
    "SAMPLERS",
    "ClassBalancedBatchSampler",
    "ClassProbabilityBatchSampler",
    "MPerClassBatchSampler",
    "ProgressiveBatchSampler",
    "SquareRootBatchSampler",
]


def _as_int(name: str, value: Any, minimum: int) -> int:
    """Validate that ``value`` is an integer >= ``minimum`` and return it as ``int``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _labels_to_numpy(labels: Any) -> np.ndarray:
    """Turn a 1-D list / array / tensor of integer class ids into an int64 numpy array."""
    if hasattr(labels, "detach"):  # torch.Tensor, without importing torch at call sites
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class id per sample), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty; the sampler needs at least one labelled sample")
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class _PlannedBatchSampler(Sampler[list[int]]):
    """Shared machinery: label grouping, epoch-seeded global plan, rank sharding."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | Any,
        batch_size: int,
        num_batches: int | None,
        seed: int,
        num_replicas: int,
        rank: int,
        drop_last: bool = True,
    ) -> None:
        self.labels = _labels_to_numpy(labels)
        self.batch_size = _as_int("batch_size", batch_size, 1)
        self.num_replicas = _as_int("num_replicas", num_replicas, 1)
        self.rank = _as_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(
                f"rank={self.rank} is out of range for num_replicas={self.num_replicas}; "
                f"rank must satisfy 0 <= rank < num_replicas"
            )
        self.seed = _as_int("seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.epoch = 0

        # Group sample indices by class: ``grouped[starts[k]:starts[k] + sizes[k]]`` are
        # the (sorted) dataset indices of the k-th present class ``self.classes[k]``.
        self.classes, inverse, self.class_sizes = np.unique(
            self.labels, return_inverse=True, return_counts=True
        )
        self._inverse = inverse.reshape(-1)
        self._grouped = np.argsort(self._inverse, kind="stable")
        self._starts = np.concatenate(([0], np.cumsum(self.class_sizes)[:-1]))

        n = len(self.labels)
        if num_batches is None:
            total = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
            total = max(1, total)
            per_rank = (
                total // self.num_replicas
                if self.drop_last
                else math.ceil(total / self.num_replicas)
            )
            self.num_batches = max(1, per_rank)
        else:
            self.num_batches = _as_int("num_batches", num_batches, 1)

    @property
    def num_classes(self) -> int:
        """Number of classes with at least one sample."""
        return len(self.classes)

    @property
    def total_batches(self) -> int:
        """Batches in the global plan (all ranks together)."""
        return self.num_batches * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the plan for ``epoch`` (same seed + epoch -> identical batches)."""
        self.epoch = _as_int("epoch", epoch, 0)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def global_plan(self, epoch: int | None = None) -> np.ndarray:
        """Return the global plan, an int64 array ``(total_batches, batch_size)``.

        Rank ``r`` iterates over rows ``r, r + num_replicas, ...`` of this array.
        """
        return self._build_plan(self._rng(self.epoch if epoch is None else epoch))

    def _build_plan(self, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.global_plan()[self.rank :: self.num_replicas]
        yield from plan.tolist()

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        return self.num_batches

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self.labels)}, classes={self.num_classes}, "
            f"batch_size={self.batch_size}, num_batches={self.num_batches}, seed={self.seed}, "
            f"rank={self.rank}/{self.num_replicas}, epoch={self.epoch})"
        )


class MPerClassBatchSampler(_PlannedBatchSampler):
    """Batches of ``P = batch_size // m_per_class`` distinct classes x ``m_per_class`` images.

    The ``P`` classes of a batch are drawn uniformly without replacement among the
    classes present. A class with ``>= m_per_class`` images contributes distinct images,
    taken by cycling through a per-epoch shuffled permutation of that class (so all of
    its images are used, evenly, over an epoch); a rarer class is sampled with
    replacement. Inside a batch, indices are grouped by class.

    Args:
        labels: 1-D integer class id per dataset index (ids need not be contiguous).
        m_per_class: images per class in a batch (``M``).
        batch_size: batch length; must be a multiple of ``m_per_class``.
        num_batches: batches per epoch *for this rank*. Default: ``len(labels) //
            batch_size`` global batches split over the ranks (at least 1 per rank).
        seed: base seed; the plan of epoch ``e`` is seeded from ``(seed, e)``.
        num_replicas, rank: DDP world size and this process's rank.
        drop_last: batches are always full; this only picks floor (``True``) or ceil
            (``False``) when deriving the default ``num_batches``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | Any,
        m_per_class: int,
        batch_size: int,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        m = _as_int("m_per_class", m_per_class, 1)
        bs = _as_int("batch_size", batch_size, 1)
        if bs % m != 0:
            lower, upper = (bs // m) * m, (bs // m + 1) * m
            examples = f"{lower} or {upper}" if lower > 0 else f"{upper} or {upper + m}"
            raise ValueError(
                f"batch_size={bs} is not divisible by m_per_class={m}; "
                f"use a multiple of {m} such as {examples}"
            )
        super().__init__(labels, bs, num_batches, seed, num_replicas, rank, drop_last)
        self.m_per_class = m
        self.classes_per_batch = bs // m
        if self.classes_per_batch > self.num_classes:
            raise ValueError(
                f"batch_size={bs} with m_per_class={m} holds {self.classes_per_batch} classes "
                f"per batch, but only {self.num_classes} classes have samples; reduce "
                f"batch_size to <= {self.num_classes * m} ({self.num_classes} x m_per_class) "
                f"or raise m_per_class"
            )

    def _build_plan(self, rng: np.random.Generator) -> np.ndarray:
        n_batches, k, p, m = (
            self.total_batches,
            self.num_classes,
            self.classes_per_batch,
            self.m_per_class,
        )

        # P distinct classes per batch: the P smallest of K random keys per row.
        keys = rng.random((n_batches, k))
        if p < k:
            chosen = np.argpartition(keys, p - 1, axis=1)[:, :p]
        else:
            chosen = np.argsort(keys, axis=1)
        chosen = np.sort(chosen, axis=1).reshape(-1)  # class positions, batch-major

        # Per-epoch shuffle within each class: sort by (class, random key).
        shuffled = np.lexsort((rng.random(len(self.labels)), self._inverse))

        out = np.empty((chosen.size, m), dtype=np.int64)
        order = np.argsort(chosen, kind="stable")  # slots grouped by class, in batch order
        uses = np.bincount(chosen, minlength=k)
        slot_starts = np.concatenate(([0], np.cumsum(uses)[:-1]))
        for c in np.flatnonzero(uses):
            size, start, n_use = self.class_sizes[c], self._starts[c], uses[c]
            perm = shuffled[start : start + size]
            if size >= m:
                # Cycle through one permutation: any M consecutive positions are distinct.
                pos = np.arange(n_use * m) % size
            else:
                pos = rng.integers(0, size, size=n_use * m)
            slots = order[slot_starts[c] : slot_starts[c] + n_use]
            out[slots] = perm[pos].reshape(n_use, m)
        return out.reshape(n_batches, p * m)


class ClassProbabilityBatchSampler(_PlannedBatchSampler):
    """Batches of independent draws: a class with probability ``p_j``, then an image uniformly.

    Subclasses define ``p_j`` through :meth:`class_probabilities` (it may depend on the epoch).
    With ``p_j = n_j^q / sum_i n_i^q`` (Kang et al., ICLR 2020, eq. 1), q = 0 is class-balanced,
    q = 1/2 square-root and q = 1 instance-balanced sampling.

    Args:
        labels: 1-D integer class id per dataset index (ids need not be contiguous).
        batch_size: batch length.
        num_batches: batches per epoch *for this rank*. Default: ``len(labels) //
            batch_size`` global batches split over the ranks (at least 1 per rank).
        seed: base seed; the plan of epoch ``e`` is seeded from ``(seed, e)``.
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | Any,
        batch_size: int,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(labels, batch_size, num_batches, seed, num_replicas, rank)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        """Probability of each present class (order of ``self.classes``) in ``epoch``."""
        raise NotImplementedError

    def _power_probabilities(self, q: float) -> np.ndarray:
        weights = self.class_sizes.astype(np.float64) ** q
        return weights / weights.sum()

    def _build_plan(self, rng: np.random.Generator) -> np.ndarray:
        shape = (self.total_batches, self.batch_size)
        cls = rng.choice(self.num_classes, size=shape, p=self.class_probabilities(self.epoch))
        within = rng.integers(0, self.class_sizes[cls])
        return self._grouped[self._starts[cls] + within]


class ClassBalancedBatchSampler(ClassProbabilityBatchSampler):
    """Class-balanced batches (stage 2 cRT): every present class equally likely (q = 0)."""

    def class_probabilities(self, epoch: int) -> np.ndarray:
        return self._power_probabilities(0.0)


class SquareRootBatchSampler(ClassProbabilityBatchSampler):
    """Square-root sampling (q = 1/2): between instance- and class-balanced."""

    def class_probabilities(self, epoch: int) -> np.ndarray:
        return self._power_probabilities(0.5)


class ProgressiveBatchSampler(ClassProbabilityBatchSampler):
    """Progressively-balanced sampling (Kang et al. 2020, eq. 2).

    ``p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB``: instance-balanced at epoch 0, class-balanced
    at epoch ``T = total_epochs``.
    """

    def __init__(self, labels, batch_size: int, total_epochs: int = 10, **kwargs) -> None:
        super().__init__(labels, batch_size, **kwargs)
        self.total_epochs = _as_int("total_epochs", total_epochs, 1)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        t = min(epoch, self.total_epochs) / self.total_epochs
        return (1 - t) * self._power_probabilities(1.0) + t * self._power_probabilities(0.0)


SAMPLERS: dict[str, type[_PlannedBatchSampler]] = {
    "m_per_class": MPerClassBatchSampler,
    "class_balanced": ClassBalancedBatchSampler,
    "sqrt": SquareRootBatchSampler,
    "progressive": ProgressiveBatchSampler,
}
