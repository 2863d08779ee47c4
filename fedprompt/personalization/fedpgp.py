"""FedPGP (Cui et al., ICML 2024): a global prompt, a low-rank local part and a contrastive term.

A site's context is ``global + U @ V`` with ``U`` (n_ctx, rank) and ``V`` (rank, width) its own,
both drawn from N(0, 0.02²). Besides the method's loss on the personalized prompt, a prompt-wise
contrastive term (temperature ``temperature``, weight ``weight``) treats the hand-crafted prompt
``"a photo of a {class}."`` and the global prompt as a positive pair and the global and the
personalized prompt as a negative pair, per class: it keeps the global prompt general and pushes
the site's knowledge into the low-rank part. The pairs, the temperature 1, the weight 1 and the
bottleneck 8 follow the public FedPGP code as federated prompt-learning benchmarks re-use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedprompt.learners import Learner
from fedprompt.learners.frozen_text import encode_sentences
from fedprompt.personalization.base import LocalPrompt, Personalization
from fedprompt.text import PromptTextEncoder

HANDCRAFTED_TEMPLATE = "a photo of a {}."


class LowRankPrompt(LocalPrompt):
    """The site's low-rank context ``U @ V`` added to the global one.

    Args:
        u: Initial ``U`` (n_ctx, rank).
        v: Initial ``V`` (rank, width).
        handcrafted: L2-normalised features (C, D) of the hand-crafted prompts (frozen).
        weight: Weight of the contrastive term.
        temperature: Its temperature.
    """

    def __init__(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        handcrafted: torch.Tensor,
        weight: float,
        temperature: float,
    ) -> None:
        super().__init__()
        self.u = torch.nn.Parameter(u)
        self.v = torch.nn.Parameter(v)
        self.handcrafted = handcrafted
        self.weight = weight
        self.temperature = temperature

    def text_features(self, encoder: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor:
        """Features of the personalized prompt, context ``ctx + U @ V``."""
        personal = ctx + (self.u @ self.v).to(ctx.dtype)
        return F.normalize(encoder.encode(personal).float(), dim=-1)

    def extra_loss(self, encoder: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor:
        """Per class, cross-entropy of (cos(hand-crafted, global), cos(global, personal))."""
        shared = F.normalize(encoder.encode(ctx).float(), dim=-1)
        personal = self.text_features(encoder, ctx)
        positive = (self.handcrafted.to(shared.device) * shared).sum(-1)
        negative = (shared * personal).sum(-1)
        logits = torch.stack([positive, negative], dim=1) / self.temperature
        target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        return self.weight * F.cross_entropy(logits, target)


@dataclass(frozen=True)
class FedPGP(Personalization):
    """Global prompt plus a low-rank local part per site.

    Attributes:
        rank: The bottleneck of ``U @ V``.
        weight: Weight of the contrastive term.
        temperature: Its temperature.
    """

    rank: int = 8
    weight: float = 1.0
    temperature: float = 1.0
    name = "fedpgp"
    needs_context = True
    personalized = True

    def local_prompt(self, learner: Learner, generator: torch.Generator) -> LowRankPrompt:
        """``U`` and ``V`` from N(0, 0.02²), and the learner's classes' hand-crafted features."""
        encoder: PromptTextEncoder = learner.prompt_encoder  # type: ignore[assignment]
        dtype = learner.ctx.dtype  # type: ignore[union-attr]
        u = torch.empty(encoder.n_ctx, self.rank, dtype=dtype).normal_(0, 0.02, generator=generator)
        v = torch.empty(self.rank, encoder.width, dtype=dtype).normal_(0, 0.02, generator=generator)
        sentences = [HANDCRAFTED_TEMPLATE.format(name) for name in learner.classnames]
        handcrafted = encode_sentences(learner.backbone, sentences)
        device = learner.ctx.device  # type: ignore[union-attr]
        return LowRankPrompt(u.to(device), v.to(device), handcrafted, self.weight, self.temperature)
