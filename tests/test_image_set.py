"""ImageSet: lazy reading, RGB conversion, subsets, transforms, errors; and root resolution."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedprompt.data import CorruptImageError, DataError, DatasetNotFoundError, ImageSet
from fedprompt.data.acquisition import draw_profile
from fedprompt.data.image_set import config_classnames, resolve_root


def _write_images(folder: Path, count: int, mode: str = "L") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new(mode, (8 + i, 6), color=10 * i if mode == "L" else (10 * i, 0, 0)).save(path)
        paths.append(path)
    return paths


def test_error_hierarchy():
    assert issubclass(DatasetNotFoundError, DataError)
    assert issubclass(CorruptImageError, DataError)
    assert issubclass(DataError, ValueError)


def test_file_items_are_read_as_rgb_with_int_labels(tmp_path):
    paths = _write_images(tmp_path, 3)
    images = ImageSet(paths, [0, 1, 1], ["a", "b"])
    assert len(images) == 3
    image, label = images[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (10, 6)
    assert image.getpixel((0, 0)) == (20, 20, 20)
    assert label == 1 and type(label) is int
    assert images.identities == [str(p) for p in paths]
    assert images.labels.dtype == np.int64


def test_in_memory_gray_and_colour_arrays_become_rgb():
    gray = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    one_channel = gray[..., None]
    colour = np.stack([gray, gray, gray], axis=-1)
    for array in (gray, one_channel, colour):
        images = ImageSet(array, [0, 1], ["a", "b"], identities=["x/0", "x/1"])
        image, label = images[1]
        assert image.mode == "RGB" and image.size == (5, 4)
        assert np.array_equal(np.asarray(image)[..., 0], gray[1])
        assert label == 1


def test_transform_is_applied_and_with_transform_leaves_original(tmp_path):
    images = ImageSet(_write_images(tmp_path, 2), [0, 1], ["a", "b"])
    to_tensor = images.with_transform(
        lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float()
    )
    tensor, _ = to_tensor[0]
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 6, 8)
    assert images.transform is None
    assert isinstance(images[0][0], Image.Image)


def test_subset_composes_and_shares_storage():
    array = np.arange(6, dtype=np.uint8).reshape(6, 1, 1).repeat(2, axis=1).repeat(2, axis=2)
    images = ImageSet(array, [0, 1, 2, 0, 1, 2], ["a", "b", "c"], [f"s/{i}" for i in range(6)])
    first = images.subset([5, 3, 1, 0])
    second = first.subset(np.array([1, 2]))
    assert second.identities == ["s/3", "s/1"]
    assert second.labels.tolist() == [0, 1]
    assert np.asarray(second[0][0])[0, 0, 0] == 3
    assert second._items is images._items
    assert second.classnames == ["a", "b", "c"]
    assert second.class_counts().tolist() == [1, 1, 0]
    assert len(images.subset([])) == 0


def test_class_counts_has_one_entry_per_class():
    images = ImageSet(np.zeros((3, 2, 2), np.uint8), [2, 2, 0], ["a", "b", "c", "d"])
    assert images.class_counts().tolist() == [1, 0, 2, 0]


def test_invalid_construction_and_subset_raise_data_error(tmp_path):
    paths = _write_images(tmp_path, 2)
    with pytest.raises(DataError, match="2 images, 3 labels"):
        ImageSet(paths, [0, 1, 1], ["a", "b"])
    with pytest.raises(DataError, match=r"Labels must lie in 0\.\.1"):
        ImageSet(paths, [0, 2], ["a", "b"])
    with pytest.raises(DataError, match="uint8"):
        ImageSet(np.zeros((2, 3, 3), np.float32), [0, 1], ["a", "b"])
    with pytest.raises(DataError, match="Subset indices"):
        ImageSet(paths, [0, 1], ["a", "b"]).subset([2])


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    images = ImageSet([bad], [0], ["a"])
    with pytest.raises(CorruptImageError, match=r"broken\.jpg") as info:
        images[0]
    assert "replace" in str(info.value)


def test_truncated_image_is_corrupt(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptImageError, match=r"cut\.jpg"):
        ImageSet([path], [0], ["a"])[0]


def test_missing_file_is_reported_as_not_found(tmp_path):
    images = ImageSet([tmp_path / "gone.png"], [0], ["a"])
    with pytest.raises(DatasetNotFoundError, match=r"gone\.png"):
        images[0]


def test_image_set_pickles_for_dataloader_workers(tmp_path):
    images = ImageSet(_write_images(tmp_path, 3), [0, 1, 0], ["a", "b"]).subset([2, 0])
    clone = pickle.loads(pickle.dumps(images))
    assert clone.identities == images.identities
    assert np.array_equal(np.asarray(clone[0][0]), np.asarray(images[0][0]))


def test_resolve_root_relative_env_and_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_root("data") == tmp_path / "data"
    assert resolve_root(None) == tmp_path / "data"
    monkeypatch.setenv("FEDPROMPT_DATA", str(tmp_path / "elsewhere"))
    assert resolve_root("${oc.env:FEDPROMPT_DATA,data}") == tmp_path / "elsewhere"
    monkeypatch.delenv("FEDPROMPT_DATA")
    assert resolve_root("${oc.env:FEDPROMPT_DATA,data}/x") == tmp_path / "data" / "x"
    assert resolve_root("~/d") == Path.home() / "d"


def test_relative_root_falls_back_to_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_root("configs") == (Path(__file__).parents[1] / "configs").resolve()
    assert resolve_root("nowhere") == (tmp_path / "nowhere").resolve()
    assert resolve_root(tmp_path) == tmp_path.resolve()
    (tmp_path / "configs").mkdir()
    assert resolve_root("configs") == (tmp_path / "configs").resolve()


def test_content_fingerprint_follows_file_size_and_mtime(tmp_path):
    paths = _write_images(tmp_path, 3)
    images = ImageSet(paths, [0, 1, 1], ["a", "b"])
    first = images.content_fingerprint()
    assert ImageSet(paths, [0, 1, 1], ["a", "b"]).content_fingerprint() == first
    swapped, ordered = images.subset([1, 0]), images.subset([0, 1])
    assert swapped.content_fingerprint() != ordered.content_fingerprint()
    stat = paths[2].stat()
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    touched = images.content_fingerprint()
    assert touched != first
    Image.new("L", (40, 30), color=7).save(paths[2])
    assert images.content_fingerprint() not in (first, touched)
    paths[2].unlink()
    assert images.content_fingerprint() != first  # absent: decoding it reports the error


def test_content_fingerprint_of_arrays_samples_the_pixels():
    pixels = np.zeros((3, 16, 16), dtype=np.uint8)
    images = ImageSet(pixels, [0, 1, 1], ["a", "b"])
    first = images.content_fingerprint()
    pixels[1] = 255
    assert images.content_fingerprint() != first
    alone = ImageSet(np.zeros((1, 16, 16), dtype=np.uint8), [0], ["a"])
    assert images.subset([0]).content_fingerprint() == alone.content_fingerprint()


def test_config_classnames():
    assert config_classnames({}) is None
    assert config_classnames({"classnames": ("a", "b")}) == ["a", "b"]
    with pytest.raises(DataError, match="YAML list"):
        config_classnames({"classnames": "a, b"})


def test_a_site_scanner_alters_what_is_read_before_the_transform_and_the_fingerprint():
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    images = ImageSet(pixels, [0, 1, 0], ["a", "b"])
    profile = draw_profile(0, 0)
    seen = images.with_acquisition(profile)
    assert images.acquisition is None
    assert np.array_equal(np.asarray(seen[1][0]), np.asarray(profile(images[1][0], "item/1")))
    assert not np.array_equal(np.asarray(seen[1][0]), pixels[1])
    subset = seen.subset([2, 1]).with_transform(lambda image: np.asarray(image).mean())
    assert subset[1][0] == np.asarray(profile(images[1][0], "item/1")).mean()
    fingerprints = {
        images.content_fingerprint(),
        seen.content_fingerprint(),
        images.with_acquisition(draw_profile(0, 1)).content_fingerprint(),
    }
    assert len(fingerprints) == 3
    assert seen.with_acquisition(None).content_fingerprint() == images.content_fingerprint()
