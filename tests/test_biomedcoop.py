"""BiomedCoOp-layout reader on the real btmri-mini data, its errors, and the dataset configs."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from fedprompt.data import (
    CorruptImageError,
    DataError,
    DatasetNotFoundError,
    default_config,
    list_datasets,
    load_dataset,
    read_biomedcoop,
)
from fedprompt.data.registry import DATASETS

PROJECT = Path(__file__).parents[1]
SHARED = PROJECT / "../shared/data"
BTMRI_MINI = SHARED / "btmri-mini"
SPLITS = SHARED / "biomedcoop-splits"
CONFIGS = PROJECT / "configs" / "dataset"
BTMRI_CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]

needs_mini = pytest.mark.skipif(
    not BTMRI_MINI.is_dir(), reason="../shared/data/btmri-mini is absent (clone without shared/)"
)
needs_splits = pytest.mark.skipif(
    not SPLITS.is_dir(), reason="../shared/data/biomedcoop-splits is absent (clone without shared/)"
)


def _yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=False)


def _make_layout(root: Path, dir_name: str = "TOY", corrupt: str | None = None) -> Path:
    """A tiny BiomedCoOp-layout dataset: 2 classes x (2 train, 1 val, 1 test)."""
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(["cat_a", "cat_b"]):
        folder = root / dir_name / dir_name / cls
        folder.mkdir(parents=True)
        for i, part in enumerate(["train", "train", "val", "test"]):
            rel = f"{cls}/im{i}.png"
            Image.new("L", (4, 4), 40 * label + i).save(root / dir_name / dir_name / rel)
            split[part].append([rel, label, cls.replace("_", " ")])
    if corrupt:
        (root / dir_name / dir_name / corrupt).write_bytes(b"not an image")
    (root / dir_name / f"split_{dir_name}.json").write_text(json.dumps(split))
    return root


@needs_mini
def test_btmri_mini_through_the_yaml_config():
    cfg = OmegaConf.load(CONFIGS / "btmri.yaml")
    cfg.root = str(BTMRI_MINI)
    splits = load_dataset(cfg)
    assert splits.name == "btmri"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (120, 20, 60)
    assert splits.classnames == BTMRI_CLASSES
    assert splits.train.classnames == BTMRI_CLASSES
    assert splits.train.identities[0] == "BTMRI/glioma_tumor/image00.jpg"
    image, label = splits.train[0]
    assert image.mode == "RGB" and label == 0
    assert splits.test.class_counts().sum() == 60
    raw = json.loads((BTMRI_MINI / "BTMRI/split_BTMRI.json").read_text())
    for part in ("train", "val", "test"):
        ids = getattr(splits, part).identities
        assert ids == [f"BTMRI/{rel}" for rel, _, _ in raw[part]]
        assert getattr(splits, part).labels.tolist() == [lab for _, lab, _ in raw[part]]
        assert all((BTMRI_MINI / "BTMRI" / i).is_file() for i in ids)


@needs_mini
def test_btmri_by_name_with_env_root(monkeypatch):
    monkeypatch.setenv("FEDPROMPT_DATA", str(BTMRI_MINI))
    splits = load_dataset("btmri")
    assert len(splits.train) == 120


@needs_mini
def test_relative_root_is_taken_from_the_working_directory(monkeypatch):
    monkeypatch.chdir(SHARED)
    cfg = {**default_config("btmri"), "root": "btmri-mini"}
    assert len(load_dataset(cfg).val) == 20


def test_missing_dataset_names_paths_and_how_to_get_it(tmp_path):
    cfg = {**default_config("btmri"), "root": str(tmp_path)}
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(cfg)
    message = str(info.value)
    assert str(tmp_path / "BTMRI" / "split_BTMRI.json") in message
    assert str(tmp_path / "BTMRI" / "BTMRI") in message
    assert f"fedprompt data download btmri --root {tmp_path}" in message
    assert "TahaKoleilat/BiomedCoOp" in message and "BTMRI.zip" in message
    assert "data/BTMRI/split_BTMRI.json" in message


@needs_mini
def test_root_one_level_too_deep_is_pointed_out():
    cfg = {**default_config("btmri"), "root": str(BTMRI_MINI / "BTMRI")}
    with pytest.raises(DatasetNotFoundError, match="set the root to its parent folder"):
        load_dataset(cfg)


@needs_mini
def test_class_list_mismatch_names_both_lists():
    cfg = {**default_config("btmri"), "root": str(BTMRI_MINI)}
    cfg["classnames"] = ["glioma", "meningioma", "pituitary", "normal"]
    with pytest.raises(DataError) as info:
        load_dataset(cfg)
    assert "glioma tumor" in str(info.value) and "'glioma'" in str(info.value)


def test_corrupt_image_in_layout_names_the_file(tmp_path):
    root = _make_layout(tmp_path, corrupt="cat_b/im1.png")
    splits = read_biomedcoop(root, "TOY", classnames=["cat a", "cat b"])
    assert splits.train[0][0].mode == "RGB"
    with pytest.raises(CorruptImageError, match=r"cat_b/im1\.png"):
        splits.train[3]


def test_missing_listed_image_is_reported(tmp_path):
    root = _make_layout(tmp_path)
    (root / "TOY/TOY/cat_a/im0.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"cat_a/im0\.png.*is missing"):
        read_biomedcoop(root, "TOY")


def test_malformed_split_files(tmp_path):
    root = _make_layout(tmp_path)
    split = root / "TOY" / "split_TOY.json"
    split.write_text("{not json")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        read_biomedcoop(root, "TOY")
    split.write_text(json.dumps({"train": [["a.png", 0]], "test": []}))
    with pytest.raises(DataError, match=r"\[rel_path, label, classname\]"):
        read_biomedcoop(root, "TOY")
    split.write_text(json.dumps({"train": [["a", 0, "x"], ["b", 0, "y"]], "test": []}))
    with pytest.raises(DataError, match="two class names"):
        read_biomedcoop(root, "TOY")
    split.write_text(json.dumps({"train": [["a", 0, "x"], ["b", 2, "y"]], "test": []}))
    with pytest.raises(DataError, match="label ids"):
        read_biomedcoop(root, "TOY")


def test_windows_separators_and_empty_val(tmp_path):
    root = _make_layout(tmp_path)
    split_file = root / "TOY" / "split_TOY.json"
    split = json.loads(split_file.read_text())
    split["train"] = [[rel.replace("/", "\\"), lab, c] for rel, lab, c in split["train"]]
    split["val"] = []
    split_file.write_text(json.dumps(split))
    splits = read_biomedcoop(root, "TOY", name="toy")
    assert splits.val is None and splits.name == "toy"
    assert splits.train.identities[0] == "TOY/cat_a/im0.png"
    assert splits.train[0][0].size == (4, 4)


def test_unknown_format_is_a_data_error():
    with pytest.raises(DataError, match="format 'nope'"):
        load_dataset({"name": "x", "format": "nope"})
    with pytest.raises(DataError, match="Unknown dataset"):
        load_dataset("not-a-dataset")


def test_every_config_is_named_after_its_file_and_matches_the_registry():
    # A variant (btmri_mini: BTMRI with the shipped root) builds on a base config via defaults.
    stems = sorted(p.stem for p in CONFIGS.glob("*.yaml") if "defaults" not in _yaml(p.stem))
    assert stems == list_datasets()
    for stem in stems:
        cfg = _yaml(stem)
        assert cfg["name"] == stem
        assert {"name", "format", "root", "classnames"} <= set(cfg)
        assert cfg == default_config(stem)


def test_biomedcoop_configs_cover_the_eleven_datasets():
    dirs = sorted(_yaml(n)["dir"] for n in list_datasets() if _yaml(n)["format"] == "biomedcoop")
    assert dirs == sorted(
        [
            "BTMRI",
            "BUSI",
            "CHMNIST",
            "COVID_19",
            "CTKidney",
            "DermaMNIST",
            "KneeXray",
            "Kvasir",
            "LungColon",
            "OCTMNIST",
            "RETINA",
        ]
    )
    assert _yaml("octmnist")["classnames"] == [
        "choroidal neovascularization",
        "diabetic macular edema",
        "drusen",
        "normal",
    ]


@needs_splits
@pytest.mark.parametrize("path", sorted(SPLITS.glob("split_*.json")), ids=lambda p: p.stem)
def test_config_classnames_and_sizes_match_the_real_split_files(path):
    dir_name = path.stem.removeprefix("split_")
    [info] = [i for i in DATASETS.values() if i.options.get("dir") == dir_name]
    raw = json.loads(path.read_text())
    names: dict[int, str] = {}
    for rows in raw.values():
        names.update({label: classname for _, label, classname in rows})
    assert list(info.classnames) == [names[i] for i in range(len(names))]
    assert info.sizes == tuple(len(raw[s]) for s in ("train", "val", "test"))
    assert all(not rel.startswith(("/", dir_name)) for rel, _, _ in raw["train"][:50])


@needs_splits
def test_real_split_file_read_through_the_reader(tmp_path):
    """The full BTMRI split parses; the reader then asks for the (absent) images."""
    (tmp_path / "BTMRI" / "BTMRI").mkdir(parents=True)
    (tmp_path / "BTMRI" / "split_BTMRI.json").write_bytes(
        (SPLITS / "split_BTMRI.json").read_bytes()
    )
    with pytest.raises(DatasetNotFoundError, match=r"glioma_tumor/image03\.jpg"):
        read_biomedcoop(tmp_path, "BTMRI", classnames=BTMRI_CLASSES)


def test_labels_are_int64(tmp_path):
    splits = read_biomedcoop(_make_layout(tmp_path), "TOY")
    assert splits.train.labels.dtype == np.int64
    assert splits.classnames == ["cat a", "cat b"]
    assert splits.num_classes == 2


def test_the_btmri_mini_variant_is_btmri_with_the_shipped_root():
    from fedprompt.config import compose_config

    mini = compose_config(None, ["dataset=btmri_mini"]).dataset
    base = compose_config(None, ["dataset=btmri"]).dataset
    assert mini.root == "../shared/data/btmri-mini" and mini.synthetic_fallback
    assert {k: v for k, v in mini.items() if k not in ("name", "root", "synthetic_fallback")} == {
        k: v for k, v in base.items() if k not in ("name", "root")
    }
    # Choosing another dataset drops the shipped root with the rest of the group.
    other = compose_config("quickstart", ["dataset=synthetic"]).dataset
    assert "btmri-mini" not in str(other.root)
