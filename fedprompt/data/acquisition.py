"""Simulated scanners: each site sees its images through its own seeded acquisition profile.

Hospitals differ not only in which patients they see but in how they image them: MRI and X-ray
sites differ in contrast and gamma (windowing, field strength, detector response), sharpness,
noise, acquisition resolution and stored bit depth. ``partition.acquisition=scanner`` gives every
simulated site one ``AcquisitionProfile`` drawn from the run seed and the site index, and applies
it to every image the site reads (training and test) before the backbone's transform.

A profile is deterministic for its seed and site, and so is what it does to one image: the noise
of an image is seeded from the profile and the image's identity, never from the order images are
read in. The profile's ``key`` names every parameter; ``ImageSet.content_fingerprint`` includes it,
so the feature cache keeps each profile's features apart.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter

from fedprompt.data.image_set import DataError

ACQUISITIONS = ("none", "scanner")
"""Values of ``partition.acquisition``: no simulated scanners, or one seeded profile per site."""

_STREAM = 0xAC0
"""Separates the profiles' draws from the run's other streams seeded by (seed, site)."""

# Ranges a scanner profile is drawn from: differences a radiologist sees between sites, not
# images a model could no longer read.
CONTRAST = (0.75, 1.25)
GAMMA = (0.7, 1.4)
BLUR_SIGMA = (0.0, 1.5)
NOISE_STD = (0.0, 0.04)
SCALE = (0.5, 1.0)
BITS = (5, 8)


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one simulated scanner alters every image a site reads.

    Attributes:
        contrast: Gain about mid-grey (1: unchanged).
        gamma: Exponent on intensities in [0, 1] after the gain (1: unchanged).
        blur: Gaussian blur sigma in pixels of the stored image (0: none).
        noise: Standard deviation of additive Gaussian noise, as a fraction of the full range;
            the same in every channel, so grey images stay grey.
        scale: Acquisition resolution relative to the stored image: the image is reduced to this
            fraction of its size and enlarged back (1: unchanged).
        bits: Bit depth the intensities are quantised to (8: unchanged).
    """

    contrast: float
    gamma: float
    blur: float
    noise: float
    scale: float
    bits: int

    @property
    def key(self) -> str:
        """Canonical text naming every parameter; equal profiles, equal keys."""
        return (
            f"scanner(contrast={self.contrast:.4f},gamma={self.gamma:.4f},blur={self.blur:.4f},"
            f"noise={self.noise:.4f},scale={self.scale:.4f},bits={self.bits})"
        )

    def record(self) -> dict[str, float | int | str]:
        """The parameters and the key, for ``partitions.json``."""
        return {**asdict(self), "key": self.key}

    def __call__(self, image: Image.Image, identity: str) -> Image.Image:
        """``image`` (RGB) as this scanner acquires it; ``identity`` seeds its noise."""
        image = image.convert("RGB")
        width, height = image.size
        if self.scale < 1.0:
            small = (max(1, round(width * self.scale)), max(1, round(height * self.scale)))
            image = image.resize(small, Image.Resampling.BILINEAR).resize(
                (width, height), Image.Resampling.BILINEAR
            )
        if self.blur > 0.0:
            image = image.filter(ImageFilter.GaussianBlur(self.blur))
        values = np.asarray(image, dtype=np.float64) / 255.0
        values = np.clip(0.5 + self.contrast * (values - 0.5), 0.0, 1.0) ** self.gamma
        if self.noise > 0.0:
            rng = np.random.default_rng(self._image_seed(identity))
            values = values + rng.normal(0.0, self.noise, size=values.shape[:2])[..., None]
        levels = (1 << self.bits) - 1
        values = np.round(np.clip(values, 0.0, 1.0) * levels) / levels
        return Image.fromarray(np.round(values * 255.0).astype(np.uint8), "RGB")

    def _image_seed(self, identity: str) -> int:
        """A seed of this profile and one image, the same in every process and read order."""
        digest = hashlib.sha256(f"{self.key}|{identity}".encode()).digest()
        return int.from_bytes(digest[:8], "little")


def draw_profile(seed: int, site_index: int) -> AcquisitionProfile:
    """Site ``site_index``'s scanner for run seed ``seed`` (numpy ``SeedSequence``).

    Raises:
        DataError: A negative seed or site index.
    """
    if seed < 0 or site_index < 0:
        raise DataError(
            f"Acquisition profiles need a seed and a site index >= 0, got seed={seed} and site "
            f"{site_index}."
        )
    rng = np.random.default_rng(np.random.SeedSequence([_STREAM, int(seed), int(site_index)]))
    low, high = math.log(GAMMA[0]), math.log(GAMMA[1])
    return AcquisitionProfile(
        contrast=round(float(rng.uniform(*CONTRAST)), 4),
        gamma=round(math.exp(float(rng.uniform(low, high))), 4),
        blur=round(float(rng.uniform(*BLUR_SIGMA)), 4),
        noise=round(float(rng.uniform(*NOISE_STD)), 4),
        scale=round(float(rng.uniform(*SCALE)), 4),
        bits=int(rng.integers(BITS[0], BITS[1] + 1)),
    )


def site_profiles(kind: str, seed: int, num_sites: int) -> list[AcquisitionProfile] | None:
    """One profile per site for ``partition.acquisition=kind``; None when ``kind`` is ``none``.

    Raises:
        DataError: An unknown kind.
    """
    if kind not in ACQUISITIONS:
        raise DataError(
            f"partition.acquisition={kind} is not known; use one of {', '.join(ACQUISITIONS)}."
        )
    if kind == "none":
        return None
    return [draw_profile(seed, index) for index in range(num_sites)]
