"""`fedprompt site check`'s library: a site config, and every problem a site's images can have."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sites_on_disk import CLASSNAMES, corrupt_one_image, write_site

from fedprompt.data.site_check import (
    SiteConfigError,
    check_site,
    format_report,
    load_site_config,
    site_dataset_config,
)

EXAMPLE = Path(__file__).parents[1] / "sites/site.example.yaml"


def test_the_template_is_a_valid_site_config():
    site = load_site_config(EXAMPLE)
    assert site.name == "hospital-a" and site.data_format == "image_folder"
    assert site.classnames == CLASSNAMES and site.device == "cpu"
    assert site.state_dir == EXAMPLE.parent / "state" and site.backbone_path is None


def test_paths_are_taken_from_the_config_folder(tmp_path):
    site = load_site_config(write_site(tmp_path, "hospital-a"))
    assert site.data_path == tmp_path / "hospital-a/images"
    assert site_dataset_config(site) == {
        "name": "hospital-a",
        "format": "image_folder",
        "root": str(tmp_path / "hospital-a/images"),
        "classnames": CLASSNAMES,
    }


def test_a_good_site_passes_with_counts_per_class(tmp_path):
    seen = []
    report = check_site(
        load_site_config(write_site(tmp_path, "hospital-a", train=3, test=2)),
        CLASSNAMES,
        on_image=lambda: seen.append(1),
    )
    assert report.ok, report.problems
    assert report.counts == {"train": [3, 3, 3, 3], "test": [2, 2, 2, 2]}
    assert len(seen) == 20  # every image decoded once
    text = format_report(report)
    assert "glioma tumor" in text and "total" in text and text.endswith("this site can join.")


def test_a_corrupt_image_is_named(tmp_path):
    config = write_site(tmp_path, "hospital-a")
    bad = corrupt_one_image(config)
    report = check_site(load_site_config(config), CLASSNAMES)
    assert not report.ok
    assert len(report.problems) == 1 and str(bad) in report.problems[0]
    assert "cannot be decoded" in report.problems[0]
    assert report.counts["train"] == [3, 3, 3, 3]  # the counts are still shown


def test_a_label_outside_the_class_list_is_refused(tmp_path):
    config = write_site(tmp_path, "hospital-a")
    stray = config.parent / "images/train/astrocytoma"
    stray.mkdir()
    shutil.copy(next((config.parent / "images/train/normal_brain").glob("*.png")), stray)
    report = check_site(load_site_config(config), CLASSNAMES)
    assert not report.ok
    assert "astrocytoma" in report.problems[0] and "classnames" in report.problems[0]


def test_an_empty_training_split_is_refused(tmp_path):
    config = write_site(tmp_path, "hospital-a")
    for image in (config.parent / "images/train").rglob("*.png"):
        image.unlink()
    report = check_site(load_site_config(config), CLASSNAMES)
    assert not report.ok
    assert "No images" in report.problems[0] and "train" in report.problems[0]


def test_a_site_without_test_images_can_join_with_a_warning(tmp_path):
    report = check_site(load_site_config(write_site(tmp_path, "hospital-a", test=0)), CLASSNAMES)
    assert report.ok, report.problems
    assert report.counts == {"train": [3, 3, 3, 3], "test": [0, 0, 0, 0]}
    assert len(report.warnings) == 1 and "no test images" in report.warnings[0]


def test_the_report_names_the_image_modes_it_found(tmp_path):
    config = write_site(tmp_path, "hospital-a")
    scans = sorted((config.parent / "images").rglob("*.png"))[:5]
    for i, scan in enumerate(scans):
        Image.fromarray(np.full((32, 32), 1000 + 100 * i, np.uint16)).save(scan)
    report = check_site(load_site_config(config), CLASSNAMES)
    assert report.ok, report.problems
    sixteen = "I;16 (16-bit greyscale, rescaled from each image's range)"
    assert report.modes == {sixteen: 5, "RGB (8-bit colour)": 15}
    assert f"image modes: RGB (8-bit colour) x 15, {sixteen} x 5" in format_report(report)


def test_class_names_must_equal_the_federations(tmp_path):
    report = check_site(
        load_site_config(write_site(tmp_path, "hospital-a")), list(reversed(CLASSNAMES))
    )
    assert not report.ok
    assert "in its order" in report.problems[0]


def test_a_class_without_training_images_is_a_warning(tmp_path):
    config = write_site(tmp_path, "hospital-a")
    for image in (config.parent / "images/train/normal_brain").glob("*.png"):
        image.unlink()
    report = check_site(load_site_config(config), CLASSNAMES)
    assert report.ok
    assert report.counts["train"] == [3, 3, 3, 0]
    assert report.warnings == ["The train split has no images of ['normal brain']."]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"site_name": None}, "lacks site_name"),
        ({"classnames": "glioma tumor"}, "YAML list"),
        ({"data": {"format": "dicom", "path": "x"}}, "data.format 'dicom'"),
        ({"data": {"format": "biomedcoop", "path": "x"}}, "without data.dir"),
        ({"data": {"path": "x", "dir": "BTMRI"}}, "does not use"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"require_secure_aggregation": "yes"}, "require_secure_aggregation 'yes'; use true"),
    ],
)
def test_a_malformed_config_is_one_sentence(tmp_path, change, message):
    config = write_site(tmp_path, "hospital-a")
    data = yaml.safe_load(config.read_text()) | change
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(SiteConfigError, match=message):
        load_site_config(config)


def test_a_missing_config_says_where_the_template_is(tmp_path):
    with pytest.raises(SiteConfigError, match=r"site\.example\.yaml"):
        load_site_config(tmp_path / "nope.yaml")
