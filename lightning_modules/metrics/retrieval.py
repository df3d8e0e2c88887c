"""Exact k-NN retrieval metrics on embeddings: Precision@1, Recall@K and MAP@R.

:func:`retrieval_metrics` computes, for every query, its nearest references with a
chunked exact top-k on torch (at most ``chunk_size`` query rows of the score matrix
exist at a time, so memory is ``O(chunk_size * num_references)`` on any device), and
returns the metrics of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020):

* ``precision_at_1``: fraction of queries whose nearest reference has the query's label.
* ``recall_at_<k>``: fraction of queries with at least one reference of their label
  among their ``k`` nearest references. This is the "Recall@K" of the metric-learning
  literature (Song et al. 2016 and Musgrave et al.; the generalisation of
  pytorch-metric-learning's ``precision_at_1`` to k neighbours, so
  ``recall_at_1 == precision_at_1``), not the information-retrieval recall
  ``hits / R``. With ``k`` larger than the number of references every query scores 1.
* ``map_at_r``: MAP@R. For a query with ``R`` references of its label,
  ``AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i)``, where ``rel(i)`` says whether the i-th
  nearest reference has the query's label and ``P(i)`` is the precision among the first
  ``i``; ``map_at_r`` is their mean.

Conventions (those of pytorch-metric-learning's ``AccuracyCalculator``, whose values these
equal; see ``tests/test_retrieval.py``):

* ``reference=None``: the queries are their own references, leave-one-out: a query is
  never its own neighbour and does not count in its own ``R`` (``exclude_self`` defaults
  to True then; PML's ``ref_includes_query``). With a separate reference set
  ``exclude_self`` defaults to False; ``exclude_self=True`` there means query ``i`` is
  reference ``i`` (PML's convention: the first ``len(query)`` references are the
  queries, with the same labels).
* A query whose label has no reference (after excluding itself) cannot be scored and is
  left out of every metric (PML's "lone" queries). If no query is left, every value is
  NaN.
* ``per_class_average=True``: each metric is averaged over the queries of each class
  first, then over the classes of the scored queries (PML's ``avg_of_avgs``).
* ``distance="cosine"``: cosine similarity of L2-normalised embeddings (larger = nearer);
  ``"euclidean"``: Euclidean distance of the raw embeddings (``torch.cdist``). Scores are
  computed in float32 (float64 for float64 inputs), the way PML does.
* Ties: neighbours with exactly equal scores come in an arbitrary order (``torch.topk``
  / numpy's argsort here, ``torch.topk`` or faiss in PML). A relevant reference tied with
  an irrelevant one makes the metrics depend on that order; float32 scores do tie at
  realistic sizes (about ``N^2 / 2^24`` pairs per row), so against PML at N = 20,000 the
  values agree to ~1e-8 rather than bitwise. On tie-free data they agree to float64
  rounding.

Matching PML's ``AccuracyCalculator(include=("precision_at_1",
"mean_average_precision_at_r"), avg_of_avgs=per_class_average)`` needs
``k="max_bin_count"`` (or an int >= the largest class count; a smaller k truncates
MAP@R) and an explicit ``knn_func``: its default is faiss ``IndexFlatL2`` (squared
Euclidean on the raw embeddings: our ``"euclidean"``, or our ``"cosine"`` if the
embeddings are L2-normalised first), and without faiss installed the constructor fails
(``NameError: faiss``). PML's torch fallback is ``CustomKNN(CosineSimilarity())`` for
``"cosine"`` and ``CustomKNN(LpDistance(normalize_embeddings=False))`` for
``"euclidean"`` (``LpDistance`` normalises by default).

Implementation: references are sorted by class once, so a query's relevant references are
one contiguous block of positions; queries are processed ``chunk_size`` at a time in
order of ``R``, and each chunk takes the top ``min(N_ref, max(max(k_values), max R))``
neighbours of its score block, so small classes pay for a short top-k only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["DISTANCES", "RetrievalMetrics", "merge_top_k", "retrieval_metrics", "top_k_inner_product"]

DISTANCES = ("cosine", "euclidean")


def _metric_names(k_values: Sequence[int]) -> list[str]:
    return ["precision_at_1", *(f"recall_at_{k}" for k in k_values), "map_at_r"]


def _top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Column indices of each row's ``k`` largest scores, in descending order of score.

    Equivalent to ``scores.topk(k, dim=1).indices`` (ties in either order). On CPU, for
    large ``k``, the unsorted ``torch.topk`` followed by numpy's (SIMD) argsort of the
    ``k`` values is faster than torch's sorted top-k.
    """
    if scores.device.type != "cpu" or k < 256:
        return scores.topk(k, dim=1, sorted=True).indices
    values, indices = scores.topk(k, dim=1, sorted=False)
    order = np.argsort(values.neg_().numpy(), axis=1)  # ascending negated = descending
    return indices.gather(1, torch.from_numpy(order).to(torch.long))


@torch.no_grad()
def top_k_inner_product(
    query: Tensor, reference: Tensor, k: int, chunk_size: int = 1024, exclude_self: bool = False
) -> tuple[Tensor, Tensor]:
    """Exact ``k`` largest inner products of each query row with ``reference``: (scores, indices).

    Cosine similarity when both are L2-normalised. Queries go ``chunk_size`` rows at a time, so
    at most a ``chunk_size x len(reference)`` score block exists. ``exclude_self``: query ``i``
    is reference ``i`` and is not its own neighbour (leave-one-out). Fewer than ``k``
    references: ``k`` shrinks to what exists. Rows are sorted by descending score.
    """
    k = min(int(k), reference.shape[0] - int(exclude_self))
    if k < 1:
        raise ValueError("top_k_inner_product needs at least one reference (besides the query itself)")
    scores_out, indices_out = [], []
    for start in range(0, query.shape[0], chunk_size):
        block = query[start : start + chunk_size] @ reference.T
        if exclude_self:
            rows = torch.arange(block.shape[0], device=block.device)
            block[rows, rows + start] = -math.inf
        values, indices = block.topk(k, dim=1, sorted=True)
        scores_out.append(values)
        indices_out.append(indices)
    if not scores_out:
        return query.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=query.device)
    return torch.cat(scores_out), torch.cat(indices_out)


def merge_top_k(scores: Tensor, indices: Tensor, new_scores: Tensor, new_indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k over reference chunks: the ``k`` best of two (scores, indices) lists per row.

    Equal scores keep the earlier list first (the lower reference index when chunks come in order),
    so a chunked search returns the same neighbours as one search over all references.
    """
    all_scores = torch.cat([scores, new_scores], dim=1)
    all_indices = torch.cat([indices, new_indices], dim=1)
    order = torch.argsort(all_scores, dim=1, descending=True, stable=True)[:, :k]
    return all_scores.gather(1, order), all_indices.gather(1, order)


def _check_k_values(k_values: Sequence[int]) -> list[int]:
    ks = list(k_values)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"k_values must be positive integers, got {k_values!r}")
    return list(dict.fromkeys(ks))  # unique, order kept


@torch.no_grad()
def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor | None = None,
    reference_labels: Tensor | None = None,
    k_values: Sequence[int] = (1, 5, 10),
    distance: str = "cosine",
    chunk_size: int = 1024,
    per_class_average: bool = False,
    exclude_self: bool | None = None,
) -> dict[str, float]:
    """Precision@1, Recall@k for each ``k`` and MAP@R of ``query`` against ``reference``.

    ``query`` (Nq, D) and ``reference`` (Nr, D) are embeddings, the labels (Nq,) and (Nr,)
    class ids. See the module docstring for the definitions and conventions. Returns
    ``{"precision_at_1", "recall_at_<k>"..., "map_at_r"}`` as Python floats.
    """
    ks = _check_k_values(k_values)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_size = int(chunk_size)
    if (reference is None) != (reference_labels is None):
        raise ValueError("give both reference and reference_labels, or neither")
    same_set = reference is None
    if same_set:
        reference, reference_labels = query, query_labels
    if exclude_self is None:
        exclude_self = same_set
    for name, emb, lab in (
        ("query", query, query_labels),
        ("reference", reference, reference_labels),
    ):
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(emb.shape)}")
        if lab.ndim != 1 or lab.shape[0] != emb.shape[0]:
            raise ValueError(
                f"{name}_labels must have shape ({emb.shape[0]},), got {tuple(lab.shape)}"
            )
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query and reference dimensions differ: {query.shape[1]} vs {reference.shape[1]}"
        )
    device = query.device
    reference, reference_labels = reference.to(device), reference_labels.to(device)
    query_labels = query_labels.to(device)
    num_query, num_ref = query.shape[0], reference.shape[0]
    if exclude_self and not same_set:
        if num_ref < num_query or not torch.equal(reference_labels[:num_query], query_labels):
            raise ValueError(
                "exclude_self with a separate reference set means query i is reference i: "
                "the first len(query) reference labels must equal the query labels"
            )

    nan = dict.fromkeys(_metric_names(ks), math.nan)
    if num_query == 0 or num_ref == 0:
        return nan

    # Labels -> 0..L-1 over the union, so counting is a bincount.
    classes, inverse = torch.unique(
        torch.cat([query_labels, reference_labels]), return_inverse=True
    )
    q_ids, r_ids = inverse[:num_query], inverse[num_query:]
    class_size = torch.bincount(r_ids, minlength=len(classes))
    num_relevant = class_size[q_ids] - int(exclude_self)
    scored = (num_relevant > 0).nonzero().squeeze(1)  # PML's "not lone" queries
    if scored.numel() == 0:
        return nan

    dtype = torch.float64 if torch.float64 in (query.dtype, reference.dtype) else torch.float32
    query, reference = query.to(dtype), reference.to(dtype)
    if distance == "cosine":
        query, reference = F.normalize(query, p=2, dim=1), F.normalize(reference, p=2, dim=1)
    # References sorted by class: a query's relevant references are the contiguous block
    # [first[q], first[q] + size) of positions, so relevance needs no label look-up.
    by_class = torch.argsort(r_ids, stable=True)
    reference = reference[by_class]
    position = torch.empty_like(by_class)
    position[by_class] = torch.arange(num_ref, device=device)
    first = (class_size.cumsum(0) - class_size)[q_ids]
    last = first + class_size[q_ids]
    available = num_ref - int(exclude_self)  # neighbours a query can have
    k_max = max(ks)

    # Queries in order of R, so each chunk's top-k is as short as its largest R allows.
    order = scored[torch.argsort(num_relevant[scored], stable=True)]
    hits_at_1 = torch.zeros(num_query, dtype=torch.float64, device=device)
    hits_at_k = torch.zeros(len(ks), num_query, dtype=torch.float64, device=device)
    average_precision = torch.zeros(num_query, dtype=torch.float64, device=device)
    for rows in order.split(chunk_size):
        r = num_relevant[rows]
        r_max = int(r.max())
        if distance == "cosine":
            scores = query[rows] @ reference.T  # larger = nearer
        else:
            scores = torch.cdist(query[rows], reference).neg_()  # exact: same order
        if exclude_self:
            scores[torch.arange(len(rows), device=device), position[rows]] = -math.inf
        neighbours = _top_k_indices(scores, min(available, max(k_max, r_max)))
        del scores
        relevant = (neighbours >= first[rows, None]) & (neighbours < last[rows, None])
        hits_at_1[rows] = relevant[:, 0].double()
        for j, kk in enumerate(ks):
            hits_at_k[j, rows] = relevant[:, :kk].any(dim=1).double()
        # AP@R: only the first R neighbours count (R <= k here); P(i) = hits in 1..i / i.
        relevant = relevant[:, :r_max]
        if int(r.min()) < r_max:
            ranks = torch.arange(1, r_max + 1, device=device)
            relevant = relevant & (ranks.unsqueeze(0) <= r.unsqueeze(1))
        hits_so_far = relevant.cumsum(dim=1).mul_(relevant).double()  # 0 off the hits
        inverse_rank = 1.0 / torch.arange(1, r_max + 1, device=device, dtype=torch.float64)
        average_precision[rows] = (hits_so_far @ inverse_rank) / r.double()

    values = {
        "precision_at_1": hits_at_1,
        **{f"recall_at_{kk}": hits_at_k[j] for j, kk in enumerate(ks)},
        "map_at_r": average_precision,
    }
    scored_ids = q_ids[scored]
    out = {}
    for name, per_query in values.items():
        per_query = per_query[scored]
        if per_class_average:
            sums = torch.zeros(len(classes), dtype=torch.float64, device=device)
            sums.index_add_(0, scored_ids, per_query)
            counts = torch.bincount(scored_ids, minlength=len(classes))
            present = counts > 0
            out[name] = float((sums[present] / counts[present]).mean().item())
        else:
            out[name] = float(per_query.mean().item())
    return out


class RetrievalMetrics(Metric):
    """Leave-one-out :func:`retrieval_metrics` over a validation/test epoch's embeddings.

    ``update(embeddings, labels, indices)`` with the batch's embeddings (N, D), class ids
    (N,) and dataset indices (N,). The three states are lists concatenated across ranks
    (``dist_reduce_fx="cat"``). ``compute()`` drops repeated dataset indices (a
    ``DistributedSampler`` pads the last batches by repeating samples; the first
    occurrence is kept, and a repeated index with a different label is an error), orders
    the samples by index (so the result does not depend on the number of ranks) and
    returns ``retrieval_metrics`` of the set against itself, leave-one-out: keys
    ``precision_at_1``, ``recall_at_<k>``, ``map_at_r`` (all NaN with no samples).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        k_values: Sequence[int] = (1, 5, 10),
        distance: str = "cosine",
        chunk_size: int = 1024,
        per_class_average: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.k_values = _check_k_values(k_values)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        self.chunk_size = int(chunk_size)
        self.per_class_average = bool(per_class_average)
        self.add_state("embeddings", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")
        self.add_state("indices", [], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor, indices: Tensor) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (N, D), got {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if labels.shape != (n,) or indices.shape != (n,):
            raise ValueError(
                f"labels and indices must have shape ({n},), got "
                f"{tuple(labels.shape)} and {tuple(indices.shape)}"
            )
        embeddings = embeddings.detach()
        if embeddings.dtype not in (torch.float32, torch.float64):
            embeddings = embeddings.float()
        self.embeddings.append(embeddings)
        self.labels.append(labels.detach().long())
        self.indices.append(indices.detach().long())

    def compute(self) -> dict[str, float]:
        if isinstance(self.indices, list) and len(self.indices) == 0:
            return dict.fromkeys(_metric_names(self.k_values), math.nan)
        embeddings = dim_zero_cat(self.embeddings)
        labels = dim_zero_cat(self.labels)
        indices = dim_zero_cat(self.indices)
        unique, inverse = torch.unique(indices, return_inverse=True)  # sorted
        position = torch.arange(len(indices), device=indices.device)
        first = torch.full_like(unique, len(indices)).scatter_reduce_(
            0, inverse, position, reduce="amin"
        )
        if not torch.equal(labels[first][inverse], labels):
            raise ValueError("a dataset index was seen with two different labels")
        return retrieval_metrics(
            embeddings[first],
            labels[first],
            k_values=self.k_values,
            distance=self.distance,
            chunk_size=self.chunk_size,
            per_class_average=self.per_class_average,
        )
