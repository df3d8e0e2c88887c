"""Evaluation metrics for class-imbalanced medical image classification."""

from medmetric.lightning_modules.metrics.classification import ClassificationMetrics
from medmetric.lightning_modules.metrics.retrieval import RetrievalMetrics, retrieval_metrics

__all__ = ["ClassificationMetrics", "RetrievalMetrics", "retrieval_metrics"]
