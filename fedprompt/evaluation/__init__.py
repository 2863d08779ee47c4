"""Metrics for classifiers built from a frozen backbone and a learned prompt."""

from fedprompt.evaluation.metrics import ClassificationMetrics, classification_metrics

__all__ = ["ClassificationMetrics", "classification_metrics"]
