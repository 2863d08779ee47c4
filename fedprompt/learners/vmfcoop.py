"""vMFCoOp (Shao et al., AAAI 2026): CoOp steered by von Mises-Fisher semantic anchors.

The authors' code was not available to us; the three losses follow the paper's description
(semantic anchor loss, spherical contrastive loss with an annealed temperature, symmetric
cross-entropy), with the concrete forms documented on each function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.description_prompts import DescriptionGuidedCoOp
from fedprompt.learners.frozen_text import check_templates, encode_sentences
from fedprompt.learners.registry import register_learner

_MAX_RESULTANT = 1.0 - 1e-6


def fit_vmf(unit_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse estimate of a von Mises-Fisher distribution from unit vectors (N, D).

    The mean direction is the normalised mean; the concentration uses Banerjee et al.'s
    approximation (JMLR 2005), kappa = r (D - r^2) / (1 - r^2), r the mean resultant length
    (capped just below 1, so that a single vector gives a large finite kappa).

    Returns:
        Mean direction (D,) and concentration (a scalar tensor).
    """
    mean = unit_vectors.mean(dim=0)
    dim = unit_vectors.shape[-1]
    r = mean.norm().clamp(max=_MAX_RESULTANT)
    return F.normalize(mean, dim=-1), r * (dim - r**2) / (1 - r**2)


def fuse_vmf(
    directions: torch.Tensor, concentrations: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of vMF densities (K, D), (K,): a vMF with natural parameter sum_k kappa_k mu_k."""
    natural = (concentrations.unsqueeze(-1) * directions).sum(dim=0)
    return F.normalize(natural, dim=-1), natural.norm()


def anchor_loss(
    text_features: torch.Tensor, anchors: torch.Tensor, concentrations: torch.Tensor
) -> torch.Tensor:
    """Semantic anchor loss: concentration-weighted cosine distance of class features to anchors.

    The vMF negative log-likelihood of feature t_c under anchor (mu_c, kappa_c) is
    -kappa_c mu_c . t_c up to a constant; weights are kappa normalised to mean 1.
    """
    weights = concentrations / concentrations.mean()
    return (weights * (1.0 - (text_features * anchors).sum(dim=-1))).mean()


def spherical_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Supervised contrastive loss on the sphere between images (B, D) and classes (C, D).

    Image-to-class: cross-entropy over the classes at temperature T. Class-to-image: each class
    present in the batch against all the batch's images, its own images as positives (averaged).
    The two directions are averaged.
    """
    similarity = image_features @ text_features.t() / temperature
    image_to_class = F.cross_entropy(similarity, labels)
    log_p = F.log_softmax(similarity.t(), dim=-1)
    positives = F.one_hot(labels, text_features.shape[0]).t().to(log_p)
    counts = positives.sum(dim=-1)
    present = counts > 0
    class_to_image = -((positives * log_p).sum(dim=-1)[present] / counts[present]).mean()
    return 0.5 * (image_to_class + class_to_image)


def symmetric_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, log_zero: float = -4.0
) -> torch.Tensor:
    """Symmetric cross-entropy (Wang et al., ICCV 2019): alpha CE + beta reverse CE.

    Reverse CE swaps prediction and label, with log 0 clipped to ``log_zero`` (A = -4); for a
    one-hot label it is -A (1 - p_y).
    """
    ce = F.cross_entropy(logits, labels)
    p_true = F.softmax(logits, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)
    reverse = (-log_zero * (1.0 - p_true)).mean()
    return alpha * ce + beta * reverse


def annealed_temperature(step: int, start: float, end: float, steps: int) -> float:
    """Cosine annealing from ``start`` to ``end`` over ``steps`` updates, then ``end``."""
    progress = min(step / steps, 1.0) if steps > 0 else 1.0
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


@register_learner("vmfcoop")
class VMFCoOp(DescriptionGuidedCoOp):
    """CoOp with loss SCE + ``anchor_weight`` * anchor + ``contrastive_weight`` * contrastive.

    Each class gets a unified semantic anchor: vMF distributions are fitted to the frozen features
    of its hand-written prompts (``templates``, the backbone's own wording) and of its
    descriptions (the LLM-style wording), and fused by multiplying the densities. The contrastive
    temperature is annealed over this learner's local updates; a site builds a fresh learner each
    round, so the schedule restarts every round.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        anchor_weight: Weight of the semantic anchor loss.
        contrastive_weight: Weight of the spherical contrastive loss.
        sce_alpha: Weight of cross-entropy inside the symmetric cross-entropy.
        sce_beta: Weight of reverse cross-entropy inside it.
        tau_start: Contrastive temperature at the first update.
        tau_end: Contrastive temperature after ``anneal_steps`` updates.
        anneal_steps: Length of the cosine annealing, in updates.
        templates: Hand-written prompts for the backbone-side distribution.
        **context: ``DescriptionGuidedCoOp``'s settings: descriptions, and CoOp's context
            settings n_ctx, ctx_init, class_specific, trim_padding.
    """

    per_sample_loss = False
    record_loss_note = (
        "the spherical contrastive loss sees one image, so only its image-to-class half remains"
    )

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        anchor_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        sce_alpha: float = 1.0,
        sce_beta: float = 1.0,
        tau_start: float = 0.07,
        tau_end: float = 0.01,
        anneal_steps: int = 200,
        templates: Sequence[str] = (
            "a photo of a {}.",
            "a medical image of {}.",
            "an image showing {}.",
            "a scan of {}.",
        ),
        **context: Any,
    ) -> None:
        super().__init__(backbone, classnames, **context)
        check_templates(templates)
        if tau_start <= 0 or tau_end <= 0:
            raise ValueError(f"temperatures must be positive, got {tau_start}, {tau_end}")
        self.anchor_weight = anchor_weight
        self.contrastive_weight = contrastive_weight
        self.sce_alpha = sce_alpha
        self.sce_beta = sce_beta
        self.tau_start, self.tau_end, self.anneal_steps = tau_start, tau_end, anneal_steps
        self.steps_taken = 0
        anchors, concentrations = [], []
        for name in self.classnames:
            prompts = fit_vmf(encode_sentences(backbone, [t.format(name) for t in templates]))
            described = fit_vmf(encode_sentences(backbone, self.class_descriptions[name]))
            direction, kappa = fuse_vmf(
                torch.stack([prompts[0], described[0]]), torch.stack([prompts[1], described[1]])
            )
            anchors.append(direction)
            concentrations.append(kappa)
        self.anchors = torch.stack(anchors)
        self.concentrations = torch.stack(concentrations)

    def temperature(self) -> float:
        """The contrastive temperature of the next update."""
        steps = self.steps_taken
        return annealed_temperature(steps, self.tau_start, self.tau_end, self.anneal_steps)

    def _private_terms(
        self, text: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """SCE + spherical contrastive: the terms that read the site's images."""
        images = image_features.to(text)
        labels = labels.to(text.device)
        logits = self._logit_scale * images @ text.t()
        return symmetric_cross_entropy(
            logits, labels, self.sce_alpha, self.sce_beta
        ) + self.contrastive_weight * spherical_contrastive_loss(
            images, text, labels, self.temperature()
        )

    def _anchor_term(self, text: torch.Tensor) -> torch.Tensor:
        return self.anchor_weight * anchor_loss(text, self.anchors.to(text), self.concentrations)

    def _advance(self) -> None:
        if self.training and torch.is_grad_enabled():
            self.steps_taken += 1

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """SCE + anchor + spherical contrastive; advances the temperature schedule when training."""
        self.check_extras(extras)
        text = self.text_features()
        value = self._private_terms(text, image_features, labels) + self._anchor_term(text)
        self._advance()
        return value

    def private_loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """SCE + contrastive, which DP-SGD clips per record (the schedule does not advance)."""
        self.check_extras(extras)
        return self._private_terms(self.text_features(), image_features, labels)

    def public_loss(self) -> torch.Tensor:
        """The anchor term (public prompts and descriptions only).

        DP-SGD calls it once per step, so it advances the temperature schedule there.
        """
        value = self._anchor_term(self.text_features())
        self._advance()
        return value
