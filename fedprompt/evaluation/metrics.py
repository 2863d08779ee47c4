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


@dataclass(frozen=True)
class BaseToNovelMetrics:
    """A prompt trained on the base classes, scored on the base and on the novel classes.

    ``as_dict`` keeps the base metrics under the usual keys (what the sites trained for) and
    adds the novel accuracy and the harmonic mean of the two, the protocol's headline number.
    """

    base: ClassificationMetrics
    novel: ClassificationMetrics

    @property
    def accuracy(self) -> float:
        """The base classes' accuracy."""
        return self.base.accuracy

    @property
    def harmonic_mean(self) -> float:
        """2 b n / (b + n) of the base and novel accuracies."""
        b, n = self.base.accuracy, self.novel.accuracy
        return 2 * b * n / (b + n) if b + n > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """The base metrics plus ``base_accuracy``, ``novel_*`` and ``harmonic_mean``."""
        return {
            **self.base.as_dict(),
            "base_accuracy": self.base.accuracy,
            "novel_accuracy": self.novel.accuracy,
            "novel_balanced_accuracy": self.novel.balanced_accuracy,
            "novel_macro_f1": self.novel.macro_f1,
            "novel_num_test": self.novel.num_test,
            "harmonic_mean": self.harmonic_mean,
        }


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
