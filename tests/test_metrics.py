import numpy as np
import pytest

from fedprompt.evaluation.metrics import classification_metrics, confusion_matrix


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
    metrics = classification_metrics(np.array([]), np.array([]), 3)
    assert metrics.as_dict() == {
        "accuracy": 0.0,
        "balanced_accuracy": 0.0,
        "macro_f1": 0.0,
        "num_test": 0,
    }
