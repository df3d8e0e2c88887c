"""Metric losses by name: ``build_metric_loss("supcon", temperature=0.1)`` -> nn.Module.

Every loss takes ``(embeddings (N, D), labels (N,))`` and returns a scalar. Standard losses
come from pytorch-metric-learning (``pml.py``); the seed papers' losses are ours, one per file.
"""

from medmetric.lightning_modules.losses.base import (
    MetricLoss,
    MetricLossBase,
    class_weights_from_counts,
)
from medmetric.lightning_modules.losses.metric import (
    METRIC_LOSSES,
    build_metric_loss,
    register_own_loss,
)

__all__ = ["METRIC_LOSSES", "MetricLoss", "MetricLossBase", "build_metric_loss", "class_weights_from_counts", "register_own_loss"]
