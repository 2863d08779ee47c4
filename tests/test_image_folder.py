"""Plain image-folder reader: pre-split and single-folder layouts, class naming, errors."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedprompt.data import DataError, DatasetNotFoundError, default_config, load_dataset


def _fill(folder: Path, counts: dict[str, int], ext: str = ".png") -> None:
    for cls, count in counts.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("L", (5, 5), i).save(folder / cls / f"{i:03d}{ext}")


def _cfg(root: Path, **extra) -> dict:
    return {**default_config("image_folder"), "name": "mine", "root": str(root), **extra}


def test_pre_split_layout_with_optional_val(tmp_path):
    _fill(tmp_path / "train", {"normal": 3, "abnormal": 2})
    _fill(tmp_path / "test", {"normal": 2, "abnormal": 1})
    (tmp_path / "train" / "normal" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden").mkdir()
    splits = load_dataset(_cfg(tmp_path))
    assert splits.classnames == ["abnormal", "normal"]
    assert (len(splits.train), len(splits.test)) == (5, 3)
    assert splits.val is None
    assert splits.train.class_counts().tolist() == [2, 3]
    assert splits.train.identities[0] == "mine/train/abnormal/000.png"
    assert splits.train[0][0].mode == "RGB"
    _fill(tmp_path / "val", {"normal": 1})
    assert len(load_dataset(_cfg(tmp_path)).val) == 1


def test_an_empty_test_folder_is_an_empty_test_split(tmp_path):
    _fill(tmp_path / "train", {"normal": 3, "abnormal": 2})
    _fill(tmp_path / "test", {"normal": 0, "abnormal": 0})
    splits = load_dataset(_cfg(tmp_path))
    assert len(splits.train) == 5 and len(splits.test) == 0
    assert splits.test.class_counts().tolist() == [0, 0]
    (tmp_path / "test" / "normal").rmdir()
    (tmp_path / "test" / "abnormal").rmdir()
    assert len(load_dataset(_cfg(tmp_path)).test) == 0
    for image in (tmp_path / "train").rglob("*.png"):
        image.unlink()
    with pytest.raises(DatasetNotFoundError, match="No images"):
        load_dataset(_cfg(tmp_path))  # an empty train/ is still an error


def test_single_folder_is_split_per_class_with_the_seed(tmp_path):
    _fill(tmp_path, {"b": 10, "a": 5}, ext=".jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "extra.TIFF")
    first = load_dataset(_cfg(tmp_path, test_fraction=0.2, seed=3))
    again = load_dataset(_cfg(tmp_path, test_fraction=0.2, seed=3))
    other = load_dataset(_cfg(tmp_path, test_fraction=0.2, seed=4))
    assert first.classnames == ["a", "b"]
    assert first.test.class_counts().tolist() == [1, 2]
    assert first.train.class_counts().tolist() == [5, 8]
    assert first.test.identities == again.test.identities
    assert first.test.identities != other.test.identities
    assert set(first.train.identities).isdisjoint(first.test.identities)
    assert first.val is None


def test_single_folder_with_val_fraction(tmp_path):
    _fill(tmp_path, {"x": 10, "y": 10})
    splits = load_dataset(_cfg(tmp_path, test_fraction=0.2, val_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)
    ids = [set(s.identities) for s in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_listed_classnames_set_order_and_match_underscored_folders(tmp_path):
    _fill(tmp_path / "train", {"glioma_tumor": 1, "Normal_Brain": 2})
    _fill(tmp_path / "test", {"glioma_tumor": 1, "Normal_Brain": 1})
    splits = load_dataset(_cfg(tmp_path, classnames=["normal brain", "glioma tumor"]))
    assert splits.classnames == ["normal brain", "glioma tumor"]
    assert np.array_equal(splits.train.class_counts(), [2, 1])


def test_class_folder_mismatches(tmp_path):
    _fill(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="matches none of the config's classnames"):
        load_dataset(_cfg(tmp_path, classnames=["a", "c"]))
    with pytest.raises(DataError, match=r"\['c'\] have no folder"):
        load_dataset(_cfg(tmp_path, classnames=["a", "b", "c"]))
    other = tmp_path / "split"
    _fill(other / "train", {"a": 2})
    _fill(other / "test", {"a": 1, "z": 1})
    with pytest.raises(DataError, match="same class folders"):
        load_dataset(_cfg(other))


def test_missing_or_empty_roots(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset(_cfg(tmp_path / "absent"))
    with pytest.raises(DatasetNotFoundError, match="no class sub-folders"):
        load_dataset(_cfg(tmp_path))
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetNotFoundError, match="No images"):
        load_dataset(_cfg(tmp_path))


def test_invalid_fractions(tmp_path):
    _fill(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset(_cfg(tmp_path, test_fraction=0.0))
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset(_cfg(tmp_path, test_fraction=0.5, val_fraction=0.5))
