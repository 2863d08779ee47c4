"""OGKD (2026): BiomedCoOp with geometry-aware distillation on pooled and patch image tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.description_prompts import DescriptionTeacherCoOp
from fedprompt.learners.distillation import class_graph, gad_loss, lgd_loss, top_patches
from fedprompt.learners.registry import register_learner


def joint_space_patches(backbone: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised patch tokens (B, P, D) in the joint image-text space.

    Tokens already of the joint dimension D (``Backbone.encode_image_tokens``) are taken as
    they are; trunk tokens of a timm ViT (width of the trunk) go through the tower's frozen
    projection head first, as OGKD does.

    Raises:
        ValueError: The last dimension is neither D nor the image trunk's width.
    """
    dim = tokens.shape[-1]
    if dim != backbone.embed_dim:
        visual = backbone.model.visual
        trunk = getattr(visual, "trunk", None)
        if trunk is None or dim != getattr(trunk, "num_features", None):
            raise ValueError(
                f"patch_tokens have {dim} channels; expected the joint dimension "
                f"{backbone.embed_dim} or the timm trunk's width"
            )
        with torch.no_grad():
            tokens = visual.head(tokens.to(backbone.device))
    return F.normalize(tokens.float(), dim=-1)


@register_learner("ogkd")
class OGKD(DescriptionTeacherCoOp):
    """CoOp with loss CE + SCCM + ``gad_weight`` * GAD + ``lgd_weight`` * LGD.

    The teacher is BiomedCoOp's filtered description ensemble. GAD distils it on the pooled
    features after smoothing its log-probabilities over a class graph W = softmax(alpha * cos)
    of the classes' mean descriptions; LGD does the same, on the true-class channel only, for the
    ``top_k_ratio`` share of patch tokens where the teacher's true-class logit is largest. Needs
    the extra input ``patch_tokens`` (B, P, D); ``gamma = 0`` reduces GAD to BiomedCoOp's KDSP.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        gad_weight: Weight of GAD (BTMRI few-shot: 1.75).
        lgd_weight: Weight of LGD (BTMRI few-shot: 0.05).
        alpha: Sharpness of the class graph (4.0).
        gamma: Strength of the graph smoothing (0.5).
        top_k_ratio: Share of patch tokens LGD distils (0.4).
        **teacher: ``DescriptionTeacherCoOp``'s settings: sccm_weight (0.5), tau (1.5),
            descriptions, and CoOp's context settings n_ctx, ctx_init, class_specific,
            trim_padding.
    """

    required_inputs = ("patch_tokens",)

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        gad_weight: float = 1.75,
        lgd_weight: float = 0.05,
        alpha: float = 4.0,
        gamma: float = 0.5,
        top_k_ratio: float = 0.4,
        **teacher: Any,
    ) -> None:
        super().__init__(backbone, classnames, **teacher)
        if not 0 < top_k_ratio <= 1:
            raise ValueError(f"top_k_ratio must lie in (0, 1], got {top_k_ratio}")
        self.gad_weight = gad_weight
        self.lgd_weight = lgd_weight
        self.gamma = gamma
        self.top_k_ratio = top_k_ratio
        self.graph = class_graph(self.teacher.means, alpha)

    def _private_terms(
        self,
        text: torch.Tensor,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        patch_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """CE + GAD + LGD: every term that reads the site's images."""
        scale = self._logit_scale
        images = image_features.to(text)
        labels = labels.to(text.device)
        logits = scale * images @ text.t()
        teacher = self.teacher.features(images, scale)
        patches = joint_space_patches(self.backbone, patch_tokens).to(text)
        with torch.no_grad():
            patch_teacher = scale * patches @ teacher.t()
            chosen = top_patches(patch_teacher, labels, self.top_k_ratio)
        picked = patches.gather(1, chosen.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        picked_teacher = patch_teacher.gather(
            1, chosen.unsqueeze(-1).expand(-1, -1, self.num_classes)
        )
        gad = gad_loss(logits, scale * images @ teacher.t(), self.graph, self.gamma)
        lgd = lgd_loss(scale * picked @ text.t(), picked_teacher, self.graph, labels, self.gamma)
        return F.cross_entropy(logits, labels) + self.gad_weight * gad + self.lgd_weight * lgd

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """CE + SCCM + GAD + LGD; ``patch_tokens`` must come with the batch."""
        self.check_extras(extras)
        text = self.text_features()
        private = self._private_terms(text, image_features, labels, extras["patch_tokens"])
        return private + self.sccm(text)

    def private_loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """CE + GAD + LGD, the terms DP-SGD clips and noises."""
        self.check_extras(extras)
        text = self.text_features()
        return self._private_terms(text, image_features, labels, extras["patch_tokens"])
