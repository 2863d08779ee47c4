"""Few-shot sampling: counts, seeding, nesting, short classes."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedprompt.data import DataError, few_shot_indices

SPLIT = Path(__file__).parents[1] / "../shared/data/btmri-mini/BTMRI/split_BTMRI.json"
LABELS = np.repeat(np.arange(4), [30, 20, 25, 10])


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 10])
def test_k_per_class_sorted_and_unique(shots):
    idx = few_shot_indices(LABELS, shots, seed=1)
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(LABELS[idx]).tolist() == [shots] * 4


def test_same_seed_same_draw_other_seed_other_draw():
    assert np.array_equal(few_shot_indices(LABELS, 4, 1), few_shot_indices(LABELS, 4, 1))
    draws = {tuple(few_shot_indices(LABELS, 4, s)) for s in (1, 2, 3)}
    assert len(draws) == 3


def test_smaller_k_is_contained_in_larger_k():
    for k in (1, 2, 4):
        assert set(few_shot_indices(LABELS, k, 2)) <= set(few_shot_indices(LABELS, 2 * k, 2))


def test_a_class_draw_does_not_depend_on_other_classes():
    fewer = LABELS.copy()
    fewer[fewer == 3] = 2
    a = few_shot_indices(LABELS, 3, 7)
    b = few_shot_indices(fewer, 3, 7)
    assert np.array_equal(a[LABELS[a] == 0], b[fewer[b] == 0])


def test_zero_shots_keeps_everything():
    assert np.array_equal(few_shot_indices(LABELS, 0, 1), np.arange(len(LABELS)))


def test_short_class_gives_all_its_images_with_a_warning():
    with pytest.warns(UserWarning, match="class 3 has 10"):
        idx = few_shot_indices(LABELS, 16, 1)
    assert np.bincount(LABELS[idx]).tolist() == [16, 16, 16, 10]


def test_unsorted_labels_and_empty_input():
    labels = np.array([1, 0, 1, 0, 1])
    idx = few_shot_indices(labels, 1, 0)
    assert sorted(labels[idx].tolist()) == [0, 1]
    assert few_shot_indices(np.array([], dtype=np.int64), 2, 0).size == 0


def test_negative_arguments_are_data_errors():
    with pytest.raises(DataError):
        few_shot_indices(LABELS, -1, 1)
    with pytest.raises(DataError):
        few_shot_indices(LABELS, 1, -1)


@pytest.mark.skipif(not SPLIT.is_file(), reason="../shared/data/btmri-mini is absent")
def test_on_real_btmri_mini_labels():
    split = json.loads(SPLIT.read_text())
    train = np.array([label for _, label, _ in split["train"]])
    val = np.array([label for _, label, _ in split["val"]])
    assert np.bincount(train[few_shot_indices(train, 16, 1)]).tolist() == [16, 16, 16, 16]
    assert np.bincount(val[few_shot_indices(val, min(16, 4), 1)]).tolist() == [4, 4, 4, 4]
