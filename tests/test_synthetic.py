"""Synthetic set: BiomedCoOp layout, determinism, reuse, atomicity, learnability, errors."""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fedprompt.data.synthetic as synthetic
from fedprompt.data import DataError, default_config, generate_synthetic, load_dataset

SMALL = {
    "num_classes": 3,
    "train_per_class": 4,
    "val_per_class": 1,
    "test_per_class": 3,
    "image_size": 16,
    "seed": 5,
}


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_written_in_the_biomedcoop_layout_and_read_back(tmp_path):
    folder = generate_synthetic(tmp_path, **SMALL)
    dir_name = folder.name
    assert folder == tmp_path / dir_name
    split = json.loads((folder / f"split_{dir_name}.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [12, 3, 9]
    rel, label, classname = split["train"][0]
    assert (folder / dir_name / rel).is_file() and (label, classname) == (0, "red disc")
    splits = load_dataset({**default_config("synthetic"), **SMALL, "root": str(tmp_path)})
    assert splits.classnames == ["red disc", "green square", "blue triangle"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 3, 9)
    image, _ = splits.test[0]
    assert image.mode == "RGB" and image.size == (16, 16)
    assert splits.train.identities[0] == f"{dir_name}/red_disc/train_0000.png"


def test_generation_is_deterministic(tmp_path):
    a = generate_synthetic(tmp_path / "a", **SMALL)
    b = generate_synthetic(tmp_path / "b", **SMALL)
    c = generate_synthetic(tmp_path / "c", **{**SMALL, "seed": 6})
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_complete_set_is_reused_without_rewriting(tmp_path, monkeypatch):
    folder = generate_synthetic(tmp_path, **SMALL)
    before = _digest(folder)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete set")

    monkeypatch.setattr(synthetic, "_write", fail)
    assert generate_synthetic(tmp_path, **SMALL) == folder
    assert _digest(folder) == before


def test_no_temporary_folders_are_left(tmp_path, monkeypatch):
    generate_synthetic(tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [generate_synthetic(tmp_path, **SMALL).name]

    def crash(target, dir_name, params):
        (target / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write", crash)
    with pytest.raises(RuntimeError):
        generate_synthetic(tmp_path, **{**SMALL, "seed": 9})
    assert len(list(tmp_path.iterdir())) == 1


def test_concurrent_generation_yields_one_complete_set(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: generate_synthetic(tmp_path, **SMALL), range(2)))
    assert folders[0] == folders[1]
    assert [p.name for p in tmp_path.iterdir()] == [folders[0].name]
    assert len(load_dataset({"format": "synthetic", **SMALL, "root": str(tmp_path)}).train) == 12


def test_classes_are_learnable_from_mean_colour(tmp_path):
    params = {**SMALL, "num_classes": 6, "train_per_class": 6, "test_per_class": 6}
    splits = load_dataset({"format": "synthetic", **params, "root": str(tmp_path)})

    def features(images):
        return np.stack(
            [np.asarray(images[i][0], np.float32).mean((0, 1)) for i in range(len(images))]
        )

    train, test = features(splits.train), features(splits.test)
    centroids = np.stack([train[splits.train.labels == c].mean(0) for c in range(6)])
    predicted = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == splits.test.labels).mean() >= 0.8


def test_custom_classnames_rename_the_classes(tmp_path):
    names = ["glioma tumor", "meningioma tumor", "normal brain"]
    cfg = {"format": "synthetic", "name": "stand-in", **SMALL, "root": str(tmp_path)}
    splits = load_dataset({**cfg, "classnames": names})
    assert splits.classnames == names and splits.name == "stand-in"
    default = load_dataset(cfg)
    assert default.classnames == ["red disc", "green square", "blue triangle"]
    assert splits.train.identities[0] != default.train.identities[0]
    with pytest.raises(DataError, match="distinct names"):
        load_dataset({**cfg, "classnames": ["a", "a", "b"]})


def test_classnames_are_distinct_up_to_the_maximum():
    names = synthetic.synthetic_classnames(synthetic.MAX_CLASSES)
    assert len(set(names)) == synthetic.MAX_CLASSES == 60


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_classes", 1), ("num_classes", 61), ("train_per_class", 0), ("image_size", 4)],
)
def test_invalid_parameters(tmp_path, key, value):
    with pytest.raises(DataError, match=key):
        generate_synthetic(tmp_path, **{**SMALL, key: value})


def test_default_root_is_a_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))
    cfg = {**default_config("synthetic"), **SMALL}
    assert cfg["root"] == synthetic.DEFAULT_ROOT
    load_dataset(cfg)
    assert (tmp_path / "synthetic").is_dir()
