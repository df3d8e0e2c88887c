"""The metric-loss registry: name -> factory(num_classes, embedding_dim, class_weighted, **kwargs).

Standard losses are pytorch-metric-learning's (``pml.py``); the seed papers' losses are ours,
one per file. Every loss maps ``(embeddings (N, D), labels (N,))`` to a scalar, computes in
float32, returns a graph-connected zero when the batch has nothing to compare, and accepts
per-class weights through ``set_class_weights``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medmetric.lightning_modules.losses.center import CenterLoss
from medmetric.lightning_modules.losses.class_center_triplet import ClassCenterTripletLoss
from medmetric.lightning_modules.losses.pml import PML_LOSSES

METRIC_LOSSES: dict[str, Callable[..., nn.Module]] = dict(PML_LOSSES)


def register_own_loss(name: str, loss_class: type[nn.Module]) -> None:
    """Register one of our :class:`MetricLoss` subclasses (they always take class weights)."""

    def factory(num_classes=None, embedding_dim=None, class_weighted=False, **kwargs):
        return loss_class(num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)

    factory.__doc__ = loss_class.__doc__
    METRIC_LOSSES[name] = factory


def build_metric_loss(
    name: str, num_classes: int | None = None, embedding_dim: int | None = None, class_weighted: bool = False, **kwargs
) -> nn.Module:
    if name not in METRIC_LOSSES:
        raise ValueError(f"unknown metric loss {name!r} (model.metric_loss); valid: {sorted(METRIC_LOSSES)}")
    try:
        return METRIC_LOSSES[name](num_classes=num_classes, embedding_dim=embedding_dim, class_weighted=class_weighted, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"bad arguments for metric loss {name!r} (model.metric_loss_kwargs={kwargs}): {err}. If they "
            "belong to the loss a config file named before, reset them: --model.metric_loss_kwargs={}"
        ) from err


register_own_loss("class_center_triplet", ClassCenterTripletLoss)
register_own_loss("center", CenterLoss)
