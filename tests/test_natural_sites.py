"""Natural sites: a manifest CSV read as a dataset, and the partition along its site column."""

import numpy as np
import pytest
from PIL import Image

from fedprompt.data.image_set import DataError, DatasetNotFoundError
from fedprompt.data.natural_sites import load_manifest, natural_partition, read_manifest
from fedprompt.data.registry import load_dataset

CLASSES = ["benign", "malignant"]


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (12, 10), color=value).save(path)


def _manifest(folder, rows, header="path,label,site"):
    """Write the images each row names (relative or absolute) and the CSV listing them."""
    for i, row in enumerate(rows):
        image = row.split(",")[0]
        target = image if image.startswith("/") else folder / image
        _image(folder / target, 10 * i)
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _config(folder, **changes):
    return {"name": "derm", "format": "manifest", "root": str(folder), "classnames": None} | changes


SPLIT_ROWS = [
    "bcn/a.png,benign,BCN,train",
    "bcn/b.png,malignant,BCN,train",
    "bcn/c.png,malignant,BCN,test",
    "vienna/d.png,benign,HAM_vienna,train",
    "vienna/e.png,benign,HAM_vienna,test",
    "msk/f.png,malignant,MSK,train",
    "msk/g.png,benign,MSK,test",
]


def test_a_natural_partition_holds_each_sites_images_as_written(tmp_path):
    _manifest(tmp_path, SPLIT_ROWS, header="path,label,site,split")
    cfg = _config(tmp_path)
    splits = load_dataset(cfg)
    assert splits.classnames == CLASSES and splits.val is None
    assert splits.train.identities == [
        "derm/bcn/a.png",
        "derm/bcn/b.png",
        "derm/vienna/d.png",
        "derm/msk/f.png",
    ]
    plan = natural_partition(cfg, splits, 3)
    assert plan.site_names == ["BCN", "HAM_vienna", "MSK"]
    held = {
        name: (
            [splits.train.identities[i].split("/", 2)[2] for i in plan.train[k]],
            [splits.test.identities[i].split("/", 2)[2] for i in plan.test[k]],
        )
        for k, name in enumerate(plan.site_names)
    }
    assert held == {
        "BCN": (["a.png", "b.png"], ["c.png"]),
        "HAM_vienna": (["d.png"], ["e.png"]),
        "MSK": (["f.png"], ["g.png"]),
    }
    assert splits.train.labels.tolist() == [0, 1, 0, 1]
    assert np.asarray(splits.test[0][0]).shape == (10, 12, 3)


def test_labels_may_be_indices_into_the_listed_classes_and_paths_absolute(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "x.png"
    rows = [f"{elsewhere},1,A", "a.png,0,A", "b.png,Malignant,B"]
    _manifest(tmp_path, rows)
    manifest = read_manifest(_config(tmp_path, classnames=CLASSES, test_fraction=0.0))
    assert manifest.labels.tolist() == [1, 0, 1]
    assert manifest.images[0] == elsewhere and manifest.site_names == ["A", "B"]


def test_without_a_split_column_each_site_holds_out_a_seeded_share_of_each_class(tmp_path):
    rows = [f"s{s}/{c}{i}.png,{c},site{s}" for s in range(3) for c in CLASSES for i in range(10)]
    _manifest(tmp_path, rows)
    cfg = _config(tmp_path, test_fraction=0.2, seed=1)
    splits = load_manifest(cfg)
    plan = natural_partition(cfg, splits, 3)
    for k in range(3):
        assert splits.train.subset(plan.train[k]).class_counts().tolist() == [8, 8]
        assert splits.test.subset(plan.test[k]).class_counts().tolist() == [2, 2]
    assert load_manifest(cfg).test.identities == splits.test.identities
    assert load_manifest(cfg | {"seed": 2}).test.identities != splits.test.identities


def test_the_partition_follows_a_class_subset_of_the_manifest(tmp_path):
    _manifest(tmp_path, SPLIT_ROWS, header="path,label,site,split")
    cfg = _config(tmp_path)
    splits = load_dataset(cfg)
    benign = splits.train.subset(np.flatnonzero(splits.train.labels == 0))
    subset = type(splits)(splits.name, CLASSES, benign, None, splits.test)
    plan = natural_partition(cfg, subset, 3)
    assert [len(part) for part in plan.train] == [1, 1, 0]


def test_a_num_sites_that_is_not_the_manifests_is_refused_in_one_sentence(tmp_path):
    _manifest(tmp_path, SPLIT_ROWS, header="path,label,site,split")
    cfg = _config(tmp_path)
    splits = load_dataset(cfg)
    with pytest.raises(DataError) as caught:
        natural_partition(cfg, splits, 5)
    message = str(caught.value)
    assert message.startswith("partition=natural federates the 3 sites of manifest ")
    assert "(BCN, HAM_vienna, MSK), but federation.num_sites=5; set federation.num_sites=3." in (
        message
    )
    assert "\n" not in message


def test_a_dataset_without_sites_is_refused(tmp_path):
    _manifest(tmp_path, SPLIT_ROWS, header="path,label,site,split")
    splits = load_dataset(_config(tmp_path))
    folder = _config(tmp_path, format="image_folder")
    with pytest.raises(
        DataError, match="partition=natural takes each image's site from a manifest"
    ):
        natural_partition(folder, splits, 3)


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("path,label", ["a.png,benign"], r"has no site column \(its header: path,label\)"),
        ("path,site", ["a.png,A"], r"has no label column"),
        ("path,label,site", [], r"lists no images"),
        ("path,label,site", ["a.png,benign,A", "b.png,,A"], r"line 3, column label is empty"),
        ("path,label,site", ["a.png,benign,"], r"line 2, column site is empty"),
        ("path,label,site", ["a.png,benign,A", "b.png,2,A"], r"line 3, column label: 2 is a"),
        ("path,label,site", ["a.png,benign,A", "a.png,benign,B"], r"line 3, column path: a.png is"),
        ("path,label,site", ["a.png,benign,A/B"], r"line 2, column site: 'A/B' is not a plain"),
        ("path,label,site,split", ["a.png,benign,A,val"], r"line 2, column split: 'val' is not"),
    ],
)
def test_a_bad_manifest_is_one_sentence_naming_the_row_or_column(tmp_path, header, rows, message):
    _manifest(tmp_path, rows, header=header)
    with pytest.raises(DataError, match=message) as caught:
        read_manifest(_config(tmp_path))
    assert "\n" not in str(caught.value)
    assert str(tmp_path / "manifest.csv") in str(caught.value)


def test_an_unknown_label_against_the_listed_classes_and_an_index_out_of_range(tmp_path):
    _manifest(tmp_path, ["a.png,benign,A", "b.png,nevus,A", "c.png,7,A"])
    with pytest.raises(DataError, match=r"line 3, column label: 'nevus' is neither one of the"):
        read_manifest(_config(tmp_path, classnames=CLASSES))
    _manifest(tmp_path, ["a.png,benign,A", "c.png,7,A"])
    with pytest.raises(DataError, match=r"line 3, column label: '7' .* index 0..1"):
        read_manifest(_config(tmp_path, classnames=CLASSES))


def test_a_missing_image_file_or_manifest_is_named(tmp_path):
    _manifest(tmp_path, ["a.png,benign,A", "b.png,benign,A"])
    (tmp_path / "b.png").unlink()
    with pytest.raises(DataError, match=r"line 3, column path: image file .*b.png does not exist"):
        read_manifest(_config(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"Manifest .*absent.csv does not exist"):
        read_manifest(_config(tmp_path, manifest="absent.csv"))


def test_a_test_fraction_outside_its_range_is_refused(tmp_path):
    _manifest(tmp_path, ["a.png,benign,A"])
    with pytest.raises(DataError, match=r"dataset.test_fraction=1.0 must lie in \[0, 1\)"):
        read_manifest(_config(tmp_path, test_fraction=1.0))
