"""The metric-loss registry: short name -> class ``cls(num_classes, embedding_dim, **kwargs)``.

Standard losses are pytorch-metric-learning's (``pml.py``); the seed papers' losses are ours,
one per file. Every loss maps ``(embeddings (N, D), labels (N,))`` to a scalar, computes in
float32, returns a graph-connected zero when the batch has nothing to compare, and accepts
per-class weights through ``set_class_weights``. A loss class registers its short name itself
(``short_name`` on a :class:`~medmetric.lightning_modules.losses.base.MetricLossBase` subclass),
and every module of this package is imported before a short-name lookup, so a new loss is one
new file here (or any importable module named by ``class_path``).
"""

from __future__ import annotations

from torch import nn

from medmetric.lightning_modules.losses import center, class_center_triplet, pml  # noqa: F401  (they register)
from medmetric.lightning_modules.losses.base import METRIC_LOSSES, MetricLossBase


def register_own_loss(name: str, loss_class: type[nn.Module]) -> None:
    """Register a loss class under ``name`` (classes with ``short_name`` need not call this)."""
    METRIC_LOSSES.add(name, loss_class)


def build_metric_loss(
    name, num_classes: int | None = None, embedding_dim: int | None = None, class_weighted: bool = False, **kwargs
) -> nn.Module:
    """``METRIC_LOSSES[name](num_classes, embedding_dim, **kwargs)``, class weighting switched on
    when asked; ``name`` may also be a class or factory (a typed ``model.metric_loss``)."""
    factory = METRIC_LOSSES.resolve(name)
    try:
        loss = factory(num_classes, embedding_dim, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"bad arguments for metric loss {name!r} (model.metric_loss_kwargs={kwargs}): {err}. If they "
            "belong to the loss a config file named before, reset them: --model.metric_loss_kwargs={} "
            "(or give them to the loss class: --model.metric_loss.<arg>=...)"
        ) from err
    if class_weighted:
        if not isinstance(loss, MetricLossBase):
            raise ValueError(f"{type(loss).__name__} takes no class weights (model.class_weighting needs a MetricLossBase)")
        loss.enable_class_weighting()
    return loss


__all__ = ["METRIC_LOSSES", "MetricLossBase", "build_metric_loss", "register_own_loss"]
