"""Classification metrics a clinician reads: accuracy, per class, and calibration.

Accuracy, balanced accuracy and macro-F1 say how often the model is right; per-class sensitivity
and specificity and the confusion matrix say which tumours it misses and which classes it
confuses; the expected calibration error (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017: 15 equal-width confidence bins) and the Brier score (Brier, 1950) say
whether its confidence can be taken at its word. Fractions in [0, 1]; the Brier score in [0, 2].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error, as Guo et al. use."""


@dataclass(frozen=True)
class Reliability:
    """What a reliability diagram shows: per confidence bin, the images and how many were right.

    Bin ``b`` of ``B`` holds the images whose confidence (largest class probability) lies in
    ``(b / B, (b + 1) / B]``. ``confidence`` is each bin's summed confidence, so that the ECE
    follows from these three alone; it is empty where only the counts are known (what a site
    shares under ``evaluation.share_site_histograms``).
    """

    count: tuple[int, ...]
    correct: tuple[int, ...]
    confidence: tuple[float, ...] = ()

    @property
    def ece(self) -> float | None:
        """Sum over bins of ``n_b / N * |accuracy_b - mean confidence_b|``.

        None without images or without the bins' confidence.
        """
        total = sum(self.count)
        if not total or not self.confidence:
            return None
        gaps = np.abs(np.asarray(self.correct, np.float64) - np.asarray(self.confidence))
        return float(gaps.sum() / total)

    def accuracy(self) -> list[float | None]:
        """Each bin's accuracy; None for an empty bin."""
        return [right / n if n else None for right, n in zip(self.correct, self.count, strict=True)]

    def as_dict(self) -> dict[str, list[Any]]:
        """Plain lists for JSON (``confidence`` only where known)."""
        data: dict[str, list[Any]] = {"count": list(self.count), "correct": list(self.correct)}
        if self.confidence:
            data["confidence"] = list(self.confidence)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Sequence[Any]]) -> Reliability:
        """The inverse of ``as_dict`` (a ``metrics.jsonl`` line's ``reliability``)."""
        return cls(
            tuple(int(n) for n in data["count"]),
            tuple(int(n) for n in data["correct"]),
            tuple(float(c) for c in data.get("confidence") or ()),
        )


@dataclass(frozen=True)
class ClassificationMetrics:
    """Summary of a classifier on one test set.

    Per-class lists are indexed by class id; a class without positives in the test set has no
    sensitivity (None), a class without negatives no specificity. Calibration needs the
    predicted probabilities: without them ``ece``, ``brier`` and ``reliability`` are None.
    """

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    num_test: int
    ece: float | None = None
    brier: float | None = None
    sensitivity: tuple[float | None, ...] = ()
    specificity: tuple[float | None, ...] = ()
    confusion_matrix: tuple[tuple[int, ...], ...] = ()
    reliability: Reliability | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON: scalars, per-class lists, the matrix and the reliability bins."""
        return {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "num_test": self.num_test,
            "ece": self.ece,
            "brier": self.brier,
            "sensitivity": list(self.sensitivity),
            "specificity": list(self.specificity),
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
            "reliability": None if self.reliability is None else self.reliability.as_dict(),
        }


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

    def as_dict(self) -> dict[str, Any]:
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


def sensitivity_specificity(
    matrix: np.ndarray,
) -> tuple[tuple[float | None, ...], tuple[float | None, ...]]:
    """Per class, TP / (TP + FN) and TN / (TN + FP) from a confusion matrix (rows: truth).

    One class against all the others. None where the denominator is empty: no image of the
    class (no sensitivity), or only images of it (no specificity); a made-up 0 or 1 would read
    as a result.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    total = int(matrix.sum())
    true_pos = np.diag(matrix)
    positives = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    sensitivity, specificity = [], []
    for k in range(matrix.shape[0]):
        negatives = total - int(positives[k])
        true_neg = negatives - int(predicted[k] - true_pos[k])
        sensitivity.append(float(true_pos[k] / positives[k]) if positives[k] else None)
        specificity.append(true_neg / negatives if negatives else None)
    return tuple(sensitivity), tuple(specificity)


def reliability(
    labels: np.ndarray,
    probabilities: np.ndarray,
    bins: int = ECE_BINS,
    predictions: np.ndarray | None = None,
) -> Reliability:
    """Images, correct predictions and summed confidence per equal-width confidence bin.

    The confidence is the largest class probability; bin ``b`` holds confidences in
    ``(b / bins, (b + 1) / bins]`` (Guo et al., 2017). ``predictions`` (default: the most
    probable class) are the ones the accuracy counted, taken from the logits.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return Reliability((0,) * bins, (0,) * bins, (0.0,) * bins)
    confidence = probabilities.max(axis=1)
    chosen = probabilities.argmax(axis=1) if predictions is None else np.asarray(predictions)
    correct = chosen == labels
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    right = np.bincount(index, weights=correct, minlength=bins)
    summed = np.bincount(index, weights=confidence, minlength=bins)
    return Reliability(
        tuple(int(n) for n in count),
        tuple(round(r) for r in right),
        tuple(float(s) for s in summed),
    )


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS
) -> float | None:
    """ECE over ``bins`` equal-width confidence bins (Guo et al., 2017); None without images."""
    return reliability(labels, probabilities, bins).ece


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Mean over images of ``sum_k (p_k - y_k)^2`` (Brier, 1950), in [0, 2]; None without images."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return None
    onehot = np.zeros_like(probabilities)
    onehot[np.arange(labels.size), labels] = 1.0
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def mean_sensitivity(per_class: Mapping[str, Any] | None) -> float | None:
    """The mean of the class sensitivities a ``summary.json`` ``per_class`` reports.

    Over the classes whose sensitivity is defined (those in the test split), it equals the
    balanced accuracy; None where there is none.
    """
    values = [v for v in ((per_class or {}).get("sensitivity") or {}).values() if v is not None]
    return sum(values) / len(values) if values else None


def classification_metrics(
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    probabilities: np.ndarray | None = None,
) -> ClassificationMetrics:
    """Metrics over the classes present in ``labels`` or ``predictions``.

    Balanced accuracy averages recall over the classes that occur in ``labels`` (a site may hold
    only some classes); macro-F1 averages F1 over classes that occur in either array, so a class
    that is predicted but absent still costs its false positives. ``probabilities`` (N, C), the
    softmax of the logits, adds calibration.
    """
    labels = np.asarray(labels)
    matrix = confusion_matrix(labels, predictions, num_classes)
    sensitivity, specificity = sensitivity_specificity(matrix)
    calibration: dict[str, Any] = {}
    if probabilities is not None and labels.size:
        bins = reliability(labels, probabilities, predictions=predictions)
        calibration = {
            "ece": bins.ece,
            "brier": brier_score(labels, probabilities),
            "reliability": bins,
        }
    per_class = {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "confusion_matrix": tuple(tuple(int(n) for n in row) for row in matrix),
    }
    if labels.size == 0:
        return ClassificationMetrics(0.0, 0.0, 0.0, 0, **per_class)
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
        **calibration,
        **per_class,
    )
