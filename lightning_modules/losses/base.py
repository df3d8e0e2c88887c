"""What every medmetric metric loss shares: float32 distances, class weights, safe reduction.

A loss computes per-anchor (or per-tuple) terms and the class of each term's anchor; the
reduction averages them, weighted by a per-class weight when one is set (rare-class pairs count
more), and returns an exact zero that still carries a gradient when there is nothing to average.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from medmetric.lightning_modules.registry import Registry

#: metric losses by short name; every module of this package is imported before a lookup, so a
#: new loss file registers itself (``short_name``) without an edit anywhere else
METRIC_LOSSES = Registry("metric loss", "model.metric_loss", scan=(("medmetric.lightning_modules.losses", ""),))


def zero_loss(embeddings: Tensor) -> Tensor:
    """0.0 connected to the graph, so ``backward()`` works and DDP sees every parameter used."""
    return embeddings.sum() * 0.0


def class_weights_from_counts(counts, scheme: str = "inverse", beta: float = 0.999) -> Tensor:
    """Per-class weights normalised to mean 1 over the classes that have images.

    ``inverse``: 1 / n_c. ``effective_number``: (1 - beta) / (1 - beta^n_c), Cui et al., CVPR 2019,
    eq. 3. ``none``: all ones. Classes with no images get weight 0.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    if scheme == "none":
        weights = present.double()
    elif scheme == "inverse":
        weights = torch.where(present, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    elif scheme == "effective_number":
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta} (model.class_weighting_beta)")
        weights = torch.where(present, (1 - beta) / (1 - beta ** counts), torch.zeros_like(counts))
    else:
        raise ValueError(
            f"unknown class weighting {scheme!r} (model.class_weighting); valid: ['none', 'inverse', 'effective_number']"
        )
    weights = weights * present.sum() / weights.sum()
    return weights.float()


class MetricLossBase(nn.Module):
    """What ``model.metric_loss`` accepts: ``cls(num_classes, embedding_dim, **its own args)``.

    ``MetricPretrainModule`` types ``metric_loss`` as ``Callable[[int, int], MetricLossBase]``:
    jsonargparse builds the class's own arguments from the config (``--model.metric_loss.temperature``)
    and the module supplies ``num_classes`` and ``embedding_dim``, known only at run time. A
    subclass with ``short_name`` registers itself in :data:`METRIC_LOSSES` when defined.
    """

    short_name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("short_name"):
            METRIC_LOSSES.add(cls.short_name, cls)

    def enable_class_weighting(self) -> None:
        """Prepare for :meth:`set_class_weights` (``model.class_weighting``); our own losses
        always accept weights, PML wrappers swap their reducer here."""

    def set_class_weights(self, weights: Tensor | None) -> None:
        raise NotImplementedError


#: ``model.metric_loss``: a loss class whose remaining arguments are ``(num_classes, embedding_dim)``
MetricLossFactory = Callable[[int, int], MetricLossBase]


class MetricLoss(MetricLossBase):
    """Base class of our own metric losses: ``forward(embeddings, labels) -> scalar``.

    Subclasses call :meth:`reduce` with their per-term losses and the anchor label of each term.
    ``set_class_weights`` switches on class-aware weighting; ``set_epoch`` is called by the
    LightningModule at every training epoch start (progressive schedules use it).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("class_weights", None, persistent=False)
        self.epoch = 0

    def set_class_weights(self, weights: Tensor | None) -> None:
        self.class_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def reduce(self, losses: Tensor, anchor_labels: Tensor, embeddings: Tensor) -> Tensor:
        """(Class-weighted) mean of ``losses``; a graph-connected zero when there are none."""
        if losses.numel() == 0:
            return zero_loss(embeddings)
        if self.class_weights is None:
            return losses.mean()
        weights = self.class_weights.to(losses.device)[anchor_labels]
        total = weights.sum()
        if total <= 0:
            return zero_loss(embeddings)
        return (losses * weights).sum() / total
