"""Accuracy, balanced accuracy and macro-F1 from predictions, as fractions in [0, 1]."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ClassificationMetrics:
    """Summary of a classifier on one test set."""

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    num_test: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON and Flower metric records."""
        return asdict(self)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, np.int64)), 1)
    return matrix


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int
) -> ClassificationMetrics:
    """Metrics over the classes present in ``labels`` or ``predictions``.

    Balanced accuracy averages recall over the classes that occur in ``labels`` (a site may hold
    only some classes); macro-F1 averages F1 over classes that occur in either array, so a class
    that is predicted but absent still costs its false positives.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return ClassificationMetrics(0.0, 0.0, 0.0, 0)
    matrix = confusion_matrix(labels, predictions, num_classes)
    true_pos = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    present = support > 0
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=present)
    denominator = support + predicted
    f1 = np.divide(2 * true_pos, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
    return ClassificationMetrics(
        accuracy=float(true_pos.sum() / labels.size),
        balanced_accuracy=float(recall[present].mean()),
        macro_f1=float(f1[denominator > 0].mean()),
        num_test=int(labels.size),
    )
