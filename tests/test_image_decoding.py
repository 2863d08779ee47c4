"""Image decoding: every mode PIL hands us becomes faithful 8-bit RGB, read from a file on disk."""

import warnings

import numpy as np
import pytest
from PIL import Image

from fedprompt.data import ImageSet
from fedprompt.data.image_decoding import describe_mode


def _decoded(tmp_path, image: Image.Image, suffix: str = ".png", **save) -> np.ndarray:
    """Write ``image`` to a file, read it back through an ImageSet, return its RGB pixels."""
    path = tmp_path / f"image{suffix}"
    image.save(path, **save)
    rgb, _ = ImageSet([path], [0], ["a"])[0]
    assert rgb.mode == "RGB" and rgb.size == image.size
    return np.asarray(rgb)


def _assert_rescaled(stored: np.ndarray, decoded: np.ndarray) -> None:
    """The decoded grey spans 0..255, keeps the pixel order and is the same in R, G and B."""
    assert np.array_equal(decoded[..., 0], decoded[..., 1])
    assert np.array_equal(decoded[..., 0], decoded[..., 2])
    grey = decoded[..., 0].ravel()
    assert grey.min() == 0 and grey.max() == 255
    order = np.argsort(stored.ravel(), kind="stable")
    assert np.all(np.diff(grey[order].astype(int)) >= 0)
    assert np.mean(grey == 255) < 0.05  # not saturated


# An MRI-like slice: 1000..3047 of 65535, shuffled so that order is not row order.
SLICE = np.random.default_rng(0).permutation(np.arange(1000, 3048, dtype=np.uint16)).reshape(32, 64)


@pytest.mark.parametrize(
    ("mode", "suffix"), [("I;16", ".png"), ("I;16B", ".tif")], ids=["png-I;16", "tiff-I;16B"]
)
def test_16_bit_greyscale_with_a_partial_range_is_rescaled_not_saturated(tmp_path, mode, suffix):
    dtype = "<u2" if mode == "I;16" else ">u2"
    image = Image.frombytes(mode, (64, 32), SLICE.astype(dtype).tobytes())
    decoded = _decoded(tmp_path, image, suffix)
    assert Image.open(tmp_path / f"image{suffix}").mode == mode
    _assert_rescaled(SLICE, decoded)
    expected = np.round((SLICE.astype(float) - 1000) * 255 / 2047)
    assert np.array_equal(decoded[..., 0], expected.astype(np.uint8))


def test_32_bit_integer_greyscale_is_rescaled(tmp_path):
    stored = SLICE.astype(np.int32) * 1000 - 2_000_000  # negative to about 1e6
    decoded = _decoded(tmp_path, Image.fromarray(stored), ".tif")
    _assert_rescaled(stored, decoded)


def test_float_greyscale_is_rescaled_and_nan_is_black(tmp_path):
    stored = (SLICE.astype(np.float32) - 1000) / 2047  # 0..1, as many float exports are
    stored[0, 0] = np.nan
    decoded = _decoded(tmp_path, Image.fromarray(stored), ".tif")
    assert decoded[0, 0, 0] == 0
    stored[0, 0] = -1.0  # below every other value: where a black pixel belongs in the order
    _assert_rescaled(stored, decoded)


def test_a_constant_16_bit_image_is_black_without_dividing_by_zero(tmp_path):
    image = Image.fromarray(np.full((8, 8), 40_000, np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = _decoded(tmp_path, image)
    assert np.all(decoded == 0)


def test_rgba_is_composited_on_black(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(220, 30, 30, 255), (255, 255, 255, 0), (0, 200, 0, 128)])
    decoded = _decoded(tmp_path, image)
    assert decoded[0, 0].tolist() == [220, 30, 30]  # opaque: unchanged
    assert decoded[0, 1].tolist() == [0, 0, 0]  # transparent white: black, not white
    assert decoded[0, 2].tolist() == [0, 100, 0]  # half transparent: half as bright


def test_greyscale_with_alpha_is_composited_on_black(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putdata([(200, 255), (200, 0)])
    decoded = _decoded(tmp_path, image)
    assert decoded[0].tolist() == [[200, 200, 200], [0, 0, 0]]


def test_a_palette_with_a_transparent_entry_is_composited_on_black(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 255, 255, 30, 60, 220] + [0] * 762)
    image.putdata([0, 1])
    decoded = _decoded(tmp_path, image, transparency=0)
    assert Image.open(tmp_path / "image.png").mode == "P"
    assert decoded[0].tolist() == [[0, 0, 0], [30, 60, 220]]


def test_cmyk_becomes_the_matching_rgb(tmp_path):
    image = Image.new("CMYK", (3, 1))
    image.putdata([(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)])
    decoded = _decoded(tmp_path, image, ".tif")
    assert Image.open(tmp_path / "image.tif").mode == "CMYK"
    assert decoded[0].tolist() == [[255, 0, 0], [0, 0, 0], [255, 255, 255]]


def test_a_bilevel_image_becomes_black_and_white(tmp_path):
    decoded = _decoded(tmp_path, Image.fromarray(np.eye(4, dtype=bool)))
    assert Image.open(tmp_path / "image.png").mode == "1"
    assert np.array_equal(decoded[..., 0], np.eye(4, dtype=np.uint8) * 255)


@pytest.mark.parametrize(
    ("image", "described"),
    [
        (Image.new("I;16", (1, 1)), "I;16 (16-bit greyscale, rescaled from each image's range)"),
        (Image.new("F", (1, 1)), "F (32-bit float greyscale, rescaled from each image's range)"),
        (Image.new("RGB", (1, 1)), "RGB (8-bit colour)"),
        (
            Image.new("LA", (1, 1)),
            "LA (8-bit greyscale with alpha, transparent pixels composited on black)",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else v.mode,
)
def test_modes_are_described_with_their_depth_and_treatment(image, described):
    assert describe_mode(image) == described
