"""Metrics by hand: accuracy, per-class sensitivity and specificity, the confusion matrix, and
calibration (ECE over 15 equal-width bins, Brier score)."""

import numpy as np
import pytest

from fedprompt.evaluation.metrics import (
    ECE_BINS,
    Reliability,
    brier_score,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    reliability,
    sensitivity_specificity,
)


def test_hand_computed_case():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2])
    metrics = classification_metrics(labels, predictions, num_classes=4)
    assert metrics.accuracy == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1 over the three classes present
    assert metrics.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: class0 2*2/(3+2)=0.8, class1 2*1/(2+2)=0.5, class2 2*1/(1+2)=2/3; class 3 absent
    assert metrics.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics.num_test == 6


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(np.array([0, 1, 1]), np.array([1, 1, 0]), 2)
    assert matrix.tolist() == [[0, 1], [1, 1]]


def test_empty_test_set_is_zero_not_nan():
    metrics = classification_metrics(np.array([]), np.array([]), 3, np.empty((0, 3)))
    assert metrics.as_dict() == {
        "accuracy": 0.0,
        "balanced_accuracy": 0.0,
        "macro_f1": 0.0,
        "num_test": 0,
        # Nothing to calibrate, and no class has positives or negatives.
        "ece": None,
        "brier": None,
        "sensitivity": [None, None, None],
        "specificity": [None, None, None],
        "confusion_matrix": [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
        "reliability": None,
    }


def test_sensitivity_and_specificity_by_hand():
    # The hand-computed case above: rows [2,1,0,0], [0,1,1,0], [0,0,1,0], [0,0,0,0].
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2])
    metrics = classification_metrics(labels, predictions, num_classes=4)
    assert metrics.confusion_matrix == ((2, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 0), (0, 0, 0, 0))
    # TP / (TP + FN); class 3 has no image, so no sensitivity.
    assert metrics.sensitivity == pytest.approx((2 / 3, 1 / 2, 1.0, None))
    # TN / (TN + FP): class 1 is predicted once for a class-0 image (3 of 4 negatives right),
    # class 2 once for a class-1 image (4 of 5).
    assert metrics.specificity == pytest.approx((1.0, 3 / 4, 4 / 5, 1.0))
    # The mean sensitivity over the classes present is the balanced accuracy.
    assert np.mean(metrics.sensitivity[:3]) == pytest.approx(metrics.balanced_accuracy)
    # Only images of class 0: it has no negatives, so no specificity; class 1 no positives.
    sensitivity, specificity = sensitivity_specificity(confusion_matrix([0, 0], [0, 1], 2))
    assert sensitivity == (0.5, None) and specificity == (None, 0.5)
    # Without probabilities there is nothing to calibrate.
    assert metrics.ece is None and metrics.brier is None and metrics.reliability is None


# Confidences 0.95 (right), 0.70 (wrong), 0.75 (right), 0.72 (right), away from bin edges.
LABELS = np.array([0, 1, 1, 0])
PROBABILITIES = np.array([[0.95, 0.05], [0.70, 0.30], [0.25, 0.75], [0.72, 0.28]])


def test_ece_by_hand_with_empty_bins():
    bins = reliability(LABELS, PROBABILITIES)
    assert len(bins.count) == ECE_BINS == 15
    # Bin b holds (b/15, (b+1)/15]: 0.70 and 0.72 in bin 10, 0.75 in bin 11, 0.95 in bin 14;
    # every other bin is empty and counts nothing (no 0/0).
    assert {b: n for b, n in enumerate(bins.count) if n} == {10: 2, 11: 1, 14: 1}
    assert {b: n for b, n in enumerate(bins.correct) if n} == {10: 1, 11: 1, 14: 1}
    assert bins.confidence[10] == pytest.approx(1.42)
    assert bins.accuracy()[10] == 0.5 and bins.accuracy()[0] is None
    # 2/4 |0.5 - 0.71| + 1/4 |1 - 0.75| + 1/4 |1 - 0.95|
    expected = 0.5 * 0.21 + 0.25 * 0.25 + 0.25 * 0.05
    assert expected_calibration_error(LABELS, PROBABILITIES) == pytest.approx(expected)
    assert expected == pytest.approx(0.18)
    # A perfectly confident, always right classifier is perfectly calibrated.
    assert expected_calibration_error([0, 1], np.eye(2)) == 0.0
    assert expected_calibration_error([], np.empty((0, 2))) is None
    # Counts alone (what a site may share) give a diagram but no ECE.
    assert Reliability(bins.count, bins.correct).ece is None
    assert Reliability.from_dict(bins.as_dict()) == bins


def test_brier_score_by_hand():
    # sum_k (p_k - y_k)^2 per image: 0.005, 0.98, 0.125, 0.1568; the mean of the four.
    assert brier_score(LABELS, PROBABILITIES) == pytest.approx((0.005 + 0.98 + 0.125 + 0.1568) / 4)
    assert brier_score([0], np.array([[0.0, 1.0]])) == 2.0  # confidently wrong: the maximum
    assert brier_score([], np.empty((0, 2))) is None


def test_calibration_enters_the_metrics_with_the_probabilities():
    predictions = PROBABILITIES.argmax(axis=1)
    metrics = classification_metrics(LABELS, predictions, 2, PROBABILITIES)
    assert metrics.accuracy == 0.75
    assert metrics.ece == pytest.approx(0.18)
    assert metrics.brier == pytest.approx(brier_score(LABELS, PROBABILITIES))
    assert metrics.reliability == reliability(LABELS, PROBABILITIES)
    assert metrics.as_dict()["reliability"]["count"][10] == 2
