"""Seeded augmented views of training images: view k of an image is the same crop in every run."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode


@dataclass(frozen=True)
class AugmentationSettings:
    """A random resized crop plus horizontal flip, as CoOp's configs train with.

    BiomedCoOp's configs (its CoOp baselines included) list only ``random_resized_crop`` and
    ``normalize``: they do not flip.

    Attributes:
        scale: Range of the crop's area as a fraction of the image's (Dassl's default).
        ratio: Range of the crop's aspect ratio (width / height).
        hflip: Flip half of the views left-right.
        seed: Seed of the draws; with the image identity and view index it fixes each crop.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> AugmentationSettings:
        """Settings from the ``features.augmentation`` config section; absent keys keep defaults.

        Raises:
            ValueError: A range is not two increasing positive numbers.
        """
        section = dict(section or {})
        settings = cls(
            scale=_pair(section.get("scale", cls.scale), "scale"),
            ratio=_pair(section.get("ratio", cls.ratio), "ratio"),
            hflip=bool(section.get("hflip", cls.hflip)),
            seed=int(section.get("seed", cls.seed)),
        )
        if settings.scale[1] > 1.0:
            raise ValueError(
                f"features.augmentation.scale must lie in (0, 1], not {settings.scale}"
            )
        return settings


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0 < low <= high:
        raise ValueError(
            f"features.augmentation.{name} must be two increasing positive numbers, got {value}"
        )
    return low, high


class SeededViewTransform:
    """Makes view ``k`` of an image: a random resized crop (and flip) drawn from a seeded stream.

    The stream is seeded with the settings' seed, the view index and a hash of the image's
    identity, so a view does not depend on the batch, the site, the worker or the number of
    views asked for, and can be cached under those keys.

    Args:
        size: Side of the square output (the backbone's input size).
        mean: Per-channel normalisation mean of the backbone.
        std: Per-channel normalisation standard deviation of the backbone.
        interpolation: ``bicubic`` or ``bilinear``, as the backbone's own transform uses.
        settings: Crop, flip and seed settings.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str,
        settings: AugmentationSettings,
    ) -> None:
        self.size = int(size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.interpolation = (
            InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
        )
        self.settings = settings

    @classmethod
    def for_backbone(
        cls, preprocess_cfg: Mapping[str, Any], settings: AugmentationSettings
    ) -> SeededViewTransform:
        """The transform matching an open_clip ``visual.preprocess_cfg`` (size, mean, std)."""
        size = preprocess_cfg["size"]
        return cls(
            size=int(size if isinstance(size, int) else size[0]),
            mean=preprocess_cfg["mean"],
            std=preprocess_cfg["std"],
            interpolation=str(preprocess_cfg.get("interpolation", "bicubic")),
            settings=settings,
        )

    def __repr__(self) -> str:
        """Every parameter that changes the pixels: the cache key's preprocessing part."""
        s = self.settings
        return (
            f"SeededViewTransform(size={self.size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation.value}, scale={s.scale}, ratio={s.ratio}, "
            f"hflip={s.hflip}, seed={s.seed})"
        )

    def rng(self, identity: str, view: int) -> np.random.Generator:
        """The random stream of one (image, view) pair."""
        digest = hashlib.sha256(identity.encode()).digest()
        return np.random.default_rng([self.settings.seed, view, int.from_bytes(digest[:8], "big")])

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, ...]:
        """``(top, left, height, width)`` of a crop with area and aspect drawn from the ranges.

        Up to ten draws must fit inside the image; otherwise the largest centred crop whose aspect
        lies in the ratio range is taken.
        """
        area = width * height
        log_low, log_high = math.log(self.settings.ratio[0]), math.log(self.settings.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.settings.scale)
            aspect = math.exp(rng.uniform(log_low, log_high))
            crop_w = round(math.sqrt(target * aspect))
            crop_h = round(math.sqrt(target / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        aspect = min(max(width / height, self.settings.ratio[0]), self.settings.ratio[1])
        crop_w = min(width, round(height * aspect))
        crop_h = min(height, round(crop_w / aspect))
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, image: Image.Image, identity: str, view: int) -> torch.Tensor:
        """Normalised pixels (3, size, size) of view ``view`` of ``image``."""
        rng = self.rng(identity, view)
        top, left, height, width = self.crop_box(image.width, image.height, rng)
        crop = TF.resized_crop(
            image.convert("RGB"),
            top,
            left,
            height,
            width,
            [self.size, self.size],
            self.interpolation,
            antialias=True,
        )
        if self.settings.hflip and rng.random() < 0.5:
            crop = TF.hflip(crop)
        return TF.normalize(TF.to_tensor(crop), self.mean, self.std)
