"""The image transforms a run feeds the frozen image tower, with the normalisation it asks for.

The backbone's own transform normalises with the mean and std it was trained with (BiomedCLIP:
OpenAI CLIP's). Some authors normalise with ImageNet's instead (BioVLM's Dassl config sets
``INPUT.PIXEL_MEAN/STD`` to ImageNet's); ``features.normalization=imagenet`` reproduces that.
Only mean and std change: size, resize mode and interpolation stay the backbone's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.transform import PreprocessCfg, image_transform_v2

from fedprompt.backbones.loader import Backbone

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "backbone": None,
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
"""Values of ``features.normalization``: (mean, std), or None for the backbone's own."""


def preprocess_config(backbone: Backbone, normalization: str) -> dict[str, Any]:
    """The backbone's ``visual.preprocess_cfg`` with the mean and std of ``normalization``.

    Raises:
        ValueError: ``normalization`` is not one of ``NORMALIZATIONS``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"features.normalization must be one of {', '.join(NORMALIZATIONS)}, "
            f"not {normalization!r}."
        )
    config = dict(backbone.model.visual.preprocess_cfg)
    statistics = NORMALIZATIONS[normalization]
    if statistics is not None:
        config["mean"], config["std"] = statistics
    return config


def eval_transform(backbone: Backbone, normalization: str) -> Callable:
    """The backbone's eval transform (resize, centre crop) normalised as ``normalization`` says."""
    if normalization == "backbone":
        return backbone.preprocess
    return image_transform_v2(
        PreprocessCfg(**preprocess_config(backbone, normalization)), is_train=False
    )
