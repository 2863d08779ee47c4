"""MedMNIST reader: offline BreastMNIST from the shared file, errors, and the configs' classes."""

from pathlib import Path

import medmnist
import numpy as np
import pytest
import torchvision.datasets.utils
from omegaconf import OmegaConf

from fedprompt.data import DataError, DatasetNotFoundError, default_config, load_dataset
from fedprompt.data.medmnist_reader import medmnist_classnames, npz_name
from fedprompt.data.registry import DATASETS

PROJECT = Path(__file__).parents[1]
MEDMNIST_DIR = PROJECT / "../shared/data/medmnist"
needs_breast = pytest.mark.skipif(
    not (MEDMNIST_DIR / "breastmnist.npz").is_file(),
    reason="../shared/data/medmnist/breastmnist.npz is absent (clone without shared/)",
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse)


@needs_breast
def test_breastmnist_offline_through_the_yaml_config():
    cfg = OmegaConf.load(PROJECT / "configs/dataset/breastmnist.yaml")
    cfg.root = str(MEDMNIST_DIR)
    splits = load_dataset(cfg)
    assert splits.name == "breastmnist"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (546, 78, 156)
    assert splits.classnames == ["malignant", "normal, benign"]
    assert splits.train.identities[17] == "breastmnist/train/17"
    image, label = splits.train[17]
    assert image.mode == "RGB" and image.size == (28, 28)
    with np.load(MEDMNIST_DIR / "breastmnist.npz") as raw:
        assert np.array_equal(np.asarray(image)[..., 0], raw["train_images"][17])
        assert label == int(raw["train_labels"][17, 0])
        assert np.array_equal(splits.test.labels, raw["test_labels"][:, 0])
    assert splits.train.class_counts().sum() == 546


def test_missing_npz_names_the_file_and_the_remedies(tmp_path):
    cfg = {**default_config("breastmnist"), "root": str(tmp_path), "size": 224}
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(cfg)
    message = str(info.value)
    assert str(tmp_path / "breastmnist_224.npz") in message
    assert "download: true" in message
    assert "fedprompt data download breastmnist" in message


@needs_breast
def test_class_mismatch_is_a_data_error():
    cfg = {**default_config("breastmnist"), "root": str(MEDMNIST_DIR), "classnames": ["a", "b"]}
    with pytest.raises(DataError, match="normal, benign"):
        load_dataset(cfg)


def test_unsupported_flags_and_sizes(tmp_path):
    base = {"name": "x", "format": "medmnist", "root": str(tmp_path)}
    with pytest.raises(DataError, match="multi-label"):
        load_dataset({**base, "flag": "chestmnist"})
    with pytest.raises(DataError, match="Unknown MedMNIST flag"):
        load_dataset({**base, "flag": "nosuchmnist"})
    with pytest.raises(DataError, match="3D"):
        load_dataset({**base, "flag": "organmnist3d"})
    with pytest.raises(DataError, match="size"):
        load_dataset({**base, "flag": "breastmnist", "size": 100})


def test_npz_names_follow_the_package():
    assert npz_name("breastmnist", 28) == "breastmnist.npz"
    assert npz_name("pathmnist", 224) == "pathmnist_224.npz"


@pytest.mark.parametrize(
    "name", sorted(n for n, i in DATASETS.items() if i.format == "medmnist"), ids=str
)
def test_medmnist_configs_use_the_package_labels(name):
    cfg = default_config(name)
    assert cfg["classnames"] == medmnist_classnames(cfg["flag"])
    info = medmnist.INFO[cfg["flag"]]
    assert DATASETS[name].sizes == tuple(info["n_samples"][s] for s in ("train", "val", "test"))


def test_configured_flags_include_the_requested_ones():
    flags = {default_config(n).get("flag") for n in DATASETS}
    assert {
        "breastmnist",
        "pathmnist",
        "dermamnist",
        "octmnist",
        "pneumoniamnist",
        "bloodmnist",
        "organamnist",
    } <= flags
