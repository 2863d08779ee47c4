"""Linear probe: a linear classifier on the frozen image features (the CLIP paper's baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner
from fedprompt.learners.frozen_text import template_features
from fedprompt.learners.registry import register_learner


@register_learner("linear_probe")
class LinearProbe(Learner):
    """Logits ``W x + b`` trained with cross-entropy; no text is involved after initialisation.

    CLIP (Radford et al., ICML 2021) and CoOp fit this model as an L2-regularised logistic
    regression; a federation trains it with the sites' SGD (``train.weight_decay`` is the L2 term).

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        init: ``"zeros"`` (plain logistic regression) or ``"zeroshot"``: W starts as the scaled
            hand-written prompt features, so the initial model is the zero-shot classifier.
        template: The prompt used by ``init="zeroshot"``, ``{}`` standing for the class name.
    """

    text_feature_only = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        init: str = "zeros",
        template: str = "a photo of a {}.",
    ) -> None:
        super().__init__(backbone, classnames)
        if init == "zeros":
            weight = torch.zeros(self.num_classes, backbone.embed_dim, device=backbone.device)
        elif init == "zeroshot":
            weight = self._logit_scale * template_features(backbone, self.classnames, [template])
        else:
            raise ValueError(f"init must be 'zeros' or 'zeroshot', got {init!r}")
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(torch.zeros(self.num_classes, device=backbone.device))

    def text_features(self) -> torch.Tensor:
        """The classifier's L2-normalised class directions (C, D)."""
        return F.normalize(self.weight, dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) = image_features @ W.T + b."""
        return F.linear(image_features.to(self.weight), self.weight, self.bias)
