"""Evaluation metrics for class-imbalanced medical image classification."""

from lightning_modules.metrics.classification import ClassificationMetrics

__all__ = ["ClassificationMetrics"]
