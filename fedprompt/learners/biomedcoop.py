"""BiomedCoOp (Koleilat et al., CVPR 2025): CoOp guided by class descriptions (SCCM and KDSP)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.description_prompts import DescriptionTeacherCoOp
from fedprompt.learners.distillation import kl_to_teacher
from fedprompt.learners.registry import register_learner


@register_learner("biomedcoop")
class BiomedCoOp(DescriptionTeacherCoOp):
    """CoOp with loss CE + ``sccm_weight`` * SCCM + ``kdsp_weight`` * KDSP.

    SCCM pulls each learned class feature towards the mean feature of the class's descriptions;
    KDSP distils from a zero-shot teacher built from the descriptions, after dropping outlying
    prompt sets with a z-score filter (threshold ``tau``; the released code's median/MAD step
    cancels out, see ``prompt_set_mask``). Descriptions are public, so SCCM
    uses no private data (``public_loss``; DP-SGD neither clips nor noises it) and every term
    reaches the context through the class text features; the teacher's filter is computed on the
    whole batch, so the loss is not a sum of per-sample terms, and DP-SGD takes the private
    terms (``private_loss``) one image at a time.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        kdsp_weight: Weight of KDSP (BTMRI few-shot: 0.25).
        **teacher: ``DescriptionTeacherCoOp``'s settings: sccm_weight, tau, descriptions, and
            CoOp's context settings n_ctx, ctx_init, class_specific, trim_padding.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        kdsp_weight: float = 0.25,
        **teacher: Any,
    ) -> None:
        super().__init__(backbone, classnames, **teacher)
        self.kdsp_weight = kdsp_weight

    def _private_terms(
        self, text: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        images = image_features.to(text)
        logits = self._logit_scale * images @ text.t()
        teacher = self._logit_scale * images @ self.teacher.features(images, self._logit_scale).t()
        return F.cross_entropy(logits, labels.to(logits.device)) + self.kdsp_weight * kl_to_teacher(
            logits, F.log_softmax(teacher, dim=-1)
        )

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """CE + SCCM + KDSP, with the class features computed once for all three."""
        self.check_extras(extras)
        text = self.text_features()
        return self._private_terms(text, image_features, labels) + self.sccm(text)

    def private_loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """CE + KDSP: the terms that read the site's images."""
        self.check_extras(extras)
        return self._private_terms(self.text_features(), image_features, labels)
