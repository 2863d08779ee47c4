"""KgCoOp (Yao et al., CVPR 2023): CoOp kept close to the hand-written prompts' class features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.coop import CoOp
from fedprompt.learners.frozen_text import template_features
from fedprompt.learners.registry import register_learner


def knowledge_guidance_loss(
    text_features: torch.Tensor, zeroshot_features: torch.Tensor
) -> torch.Tensor:
    """KgCoOp's L_kg as released: 1 - mean cosine of learned and hand-written class features.

    For unit vectors this is half the squared Euclidean distance of the paper's formula, averaged
    over classes; the published weight 8.0 goes with this form.
    """
    cosine = F.cosine_similarity(text_features, zeroshot_features.to(text_features), dim=-1)
    return 1.0 - cosine.mean()


@register_learner("kgcoop")
class KgCoOp(CoOp):
    """CoOp with loss CE + ``kg_weight`` * L_kg against the frozen ``template`` prompt features.

    The guidance term uses no image, only the public class names, so the private loss (CE) still
    reaches the context through the text-feature matrix alone.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        kg_weight: Weight of the knowledge-guidance term (the paper's lambda = 8.0).
        template: The hand-written prompt, ``{}`` standing for the class name.
        **context: CoOp's context settings: n_ctx, ctx_init, class_specific, trim_padding.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        kg_weight: float = 8.0,
        template: str = "a photo of a {}.",
        **context: Any,
    ) -> None:
        super().__init__(backbone, classnames, **context)
        self.kg_weight = kg_weight
        self.zeroshot_features = template_features(backbone, self.classnames, [template])

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """CE + kg_weight * L_kg; the class features are computed once for both terms."""
        self.check_extras(extras)
        text = self.text_features()
        logits = self._logit_scale * image_features.to(text) @ text.t()
        ce = F.cross_entropy(logits, labels.to(logits.device))
        return ce + self.kg_weight * knowledge_guidance_loss(text, self.zeroshot_features)
