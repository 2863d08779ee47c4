"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the frozen image features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner
from fedprompt.learners.frozen_text import template_features
from fedprompt.learners.registry import register_learner


@register_learner("clip_adapter")
class ClipAdapter(Learner):
    """Image feature ``x' = ratio * A(x) + (1 - ratio) * x``, classified by hand-written prompts.

    A is Linear(D, D/reduction) -> ReLU -> Linear(D/reduction, D) -> ReLU without biases; the
    mixed feature is L2-normalised (unless ``renormalize`` is off) and compared with the frozen
    ``template`` prompt features.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        reduction: Bottleneck reduction factor (4).
        ratio: Residual ratio, the adapter's share of the feature (0.2).
        template: The hand-written prompt, ``{}`` standing for the class name.
        renormalize: L2-normalise the mixed feature before the cosine logits (CLIP-Adapter's
            paper). False is BiomedCoOp's benchmark, which scores the unnormalised mix
            ``logit_scale * x' @ T.T``: the adapter then also rescales the logits.
    """

    text_feature_only = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        reduction: int = 4,
        ratio: float = 0.2,
        template: str = "a photo of a {}.",
        renormalize: bool = True,
    ) -> None:
        super().__init__(backbone, classnames)
        dim = backbone.embed_dim
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"reduction must be between 1 and {dim}, got {reduction}")
        self.ratio = ratio
        self.renormalize = renormalize
        self.adapter = torch.nn.Sequential(
            torch.nn.Linear(dim, dim // reduction, bias=False),
            torch.nn.ReLU(),
            torch.nn.Linear(dim // reduction, dim, bias=False),
            torch.nn.ReLU(),
        ).to(backbone.device)
        self.zeroshot_features = template_features(backbone, self.classnames, [template])

    def text_features(self) -> torch.Tensor:
        """The frozen hand-written prompt features (C, D)."""
        return self.zeroshot_features

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of the adapted image features, re-normalised unless told otherwise."""
        x = image_features.to(self.zeroshot_features)
        mixed = self.ratio * self.adapter(x) + (1.0 - self.ratio) * x
        if self.renormalize:
            mixed = F.normalize(mixed, dim=-1)
        return self._logit_scale * mixed @ self.zeroshot_features.t()
