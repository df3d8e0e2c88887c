"""Metric losses by name. ``build_metric_loss("supcon", temperature=0.1)`` -> nn.Module.

Every loss takes ``(embeddings (N, D), labels (N,))`` and returns a scalar. Standard losses
come from pytorch-metric-learning; this package only wires them to a uniform interface.
"""

from lightning_modules.losses.metric import METRIC_LOSSES, build_metric_loss

__all__ = ["METRIC_LOSSES", "build_metric_loss"]
