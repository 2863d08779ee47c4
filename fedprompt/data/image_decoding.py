"""Every image mode PIL can hand us, turned into the 8-bit RGB the backbone's preprocessing takes.

``Image.convert("RGB")`` alone is wrong for medical files in two ways. It clips 16-bit, 32-bit
and float greyscale to 0..255, so an MRI or CT slice whose values run from 1000 to 3000 becomes
white almost everywhere. And it drops alpha, so whatever colour a transparent pixel happens to
hold shows through. ``to_rgb`` fixes both; ``describe_mode`` says what it did, for site checks.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes whose values do not fit 8 bits: rescaled from each image's own range.
_HIGH_DEPTH = {
    "I;16": "16-bit greyscale",
    "I;16L": "16-bit greyscale",
    "I;16B": "16-bit greyscale",
    "I;16N": "16-bit greyscale",
    "I": "32-bit integer greyscale",
    "F": "32-bit float greyscale",
}
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_EIGHT_BIT = {
    "1": "1-bit bilevel",
    "L": "8-bit greyscale",
    "P": "8-bit palette",
    "RGB": "8-bit colour",
    "RGBX": "8-bit colour",
    "LA": "8-bit greyscale with alpha",
    "La": "8-bit greyscale with alpha",
    "PA": "8-bit palette with alpha",
    "RGBA": "8-bit colour with alpha",
    "RGBa": "8-bit colour with alpha",
    "CMYK": "8-bit CMYK, converted to RGB",
    "YCbCr": "8-bit YCbCr, converted to RGB",
    "LAB": "8-bit Lab, converted to RGB",
    "HSV": "8-bit HSV, converted to RGB",
}
RESCALED = "rescaled from each image's range"
COMPOSITED = "transparent pixels composited on black"


def _has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or a transparent palette entry or colour (``info["transparency"]``)."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _rescaled_to_8_bit(image: Image.Image) -> Image.Image:
    """Map the image's own finite min..max linearly onto 0..255 ("L").

    The image's range rather than the type's: MRI and CT files usually fill a fraction of the
    16-bit range (12-bit CT, MRI up to a few thousand), and the full range would make them nearly
    black; a per-image min-max window is also what a viewer shows when a file carries no window.
    The mapping is monotonic, so pixel order survives. A constant image, and NaN or infinite
    pixels, become 0 rather than dividing by zero.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        if high > low:
            scaled = (values[finite] - low) * (255.0 / (high - low))
            out[finite] = np.round(scaled).astype(np.uint8)
    return Image.fromarray(out)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, whatever mode it was read in.

    Greyscale deeper than 8 bits (``I;16*``, ``I``, ``F``) is rescaled from its own range
    (``_rescaled_to_8_bit``). Alpha (``RGBA``, ``LA``, ``PA``, a palette or colour marked
    transparent) is composited on black, not white: outside the field of view MRI, CT and X-ray
    images are black, so a black fill adds no edge that a model could learn as a feature.
    Bilevel, palette, CMYK and the rest go through PIL's own conversion, which is exact for them.
    """
    if image.mode in _HIGH_DEPTH:
        return _rescaled_to_8_bit(image).convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def describe_mode(image: Image.Image) -> str:
    """The image's mode, bit depth and what ``to_rgb`` does to it, e.g. ``I;16 (16-bit ...)``."""
    mode = image.mode
    if mode in _HIGH_DEPTH:
        return f"{mode} ({_HIGH_DEPTH[mode]}, {RESCALED})"
    what = _EIGHT_BIT.get(mode, "converted to RGB by PIL")
    if "transparency" in image.info and mode not in _ALPHA_MODES:
        what += " with a transparent colour"
    if _has_alpha(image):
        what += f", {COMPOSITED}"
    return f"{mode} ({what})"
