"""FedOTP (Li et al., CVPR 2024): global and local prompts aligned to patch tokens by unbalanced OT.

Each site holds two contexts, the global one (aggregated) and its own. For an image and a class,
the M patch tokens and the two prompts' class features are matched by an entropic optimal
transport plan whose prompt side is exact (mass ``mass / 2`` to each prompt) and whose patch side
is only bounded (each patch gives at most ``1 / M``): a prompt may ignore the patches that fit
it badly. The class score is ``sum(T * cos(patch, prompt))``; the plan is found without gradient
and the score is differentiated through the cosines, as FedOTP's ``GLP_OT`` trainer does with
its ``COT`` option (mass ``TOP_PERCENT`` 0.8, ``EPS`` 0.01, ``THRESH`` 1e-3, ``MAX_ITER`` 100,
the values of its few-shot script).

The plan is computed here, batched over every (image, class) pair of a step, by the same
alternating Bregman projections. POT's ``ot.partial.entropic_partial_wasserstein`` solves the
same problem (prompt marginals summing to the transported mass) one pair at a time in NumPy,
which is thousands of calls a step; the tests check this solver's plans against POT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedprompt.learners import Learner
from fedprompt.personalization.base import LocalPrompt, Personalization, fresh_context
from fedprompt.text import PromptTextEncoder


@torch.no_grad()
def partial_transport_plan(
    similarity: torch.Tensor, eps: float, mass: float, max_iter: int, thresh: float
) -> torch.Tensor:
    """Entropic OT plans (P, M, N) between M patches and N prompts, for P problems at once.

    Minimises ``<T, 1 - similarity> - eps * H(T)`` subject to ``T^T 1 = mass / N`` (each prompt
    receives its share) and ``T 1 <= 1 / M`` (no patch gives more than its weight), by FedOTP's
    alternating projections, stopped when the prompt scalings change by less than ``thresh`` on
    average. Computed in float64, the kernel shifted by each problem's largest similarity (the
    plan does not change: the transported mass is fixed).

    Args:
        similarity: Cosines (P, M, N) of patches and prompts.
        eps: Entropic regularisation.
        mass: Total mass transported, in (0, 1].
        max_iter: Most iterations.
        thresh: Stopping threshold on the mean change of the prompt scalings.
    """
    sim = similarity.double()
    _, patches, prompts = sim.shape
    shift = sim.amax(dim=(1, 2), keepdim=True)
    kernel = torch.exp((sim - shift) / eps)
    a = torch.full((patches,), 1.0 / patches, dtype=sim.dtype, device=sim.device)
    b = torch.full((prompts,), mass / prompts, dtype=sim.dtype, device=sim.device)
    u = torch.ones(sim.shape[:2], dtype=sim.dtype, device=sim.device)
    v = torch.ones((sim.shape[0], prompts), dtype=sim.dtype, device=sim.device)
    for _ in range(max_iter):
        previous = v
        u = torch.minimum(a / (kernel @ v.unsqueeze(-1)).squeeze(-1), torch.ones_like(u))
        v = b / (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
        if (v - previous).abs().mean() < thresh:
            break
    return (u.unsqueeze(-1) * kernel * v.unsqueeze(1)).to(similarity.dtype)


class TransportPrompt(LocalPrompt):
    """The site's own context; its class scores come from OT over the image's patch tokens.

    Args:
        ctx: The initial local context, shaped as the learner's.
        eps, mass, max_iter, thresh: The transport's settings (``partial_transport_plan``).
    """

    required_inputs = ("patch_tokens",)

    def __init__(
        self, ctx: torch.Tensor, eps: float, mass: float, max_iter: int, thresh: float
    ) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(ctx)
        self.eps, self.mass, self.max_iter, self.thresh = eps, mass, max_iter, thresh

    def prompt_features(self, encoder: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor:
        """L2-normalised class features (2, C, D) of the global and the local prompt."""
        both = torch.stack([encoder.encode(ctx).float(), encoder.encode(self.ctx).float()])
        return F.normalize(both, dim=-1)

    def text_features(self, encoder: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor:
        """The two prompts' mean class features (FedOTP's pooled text feature)."""
        return F.normalize(self.prompt_features(encoder, ctx).mean(dim=0), dim=-1)

    def transport_scores(
        self, encoder: PromptTextEncoder, ctx: torch.Tensor, patch_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Class scores (B, C): ``sum(T * cos)`` over patches and prompts, per image and class.

        Args:
            encoder: The learner's prompt encoder.
            ctx: The global context.
            patch_tokens: Patch tokens (B, M, D) in the joint space.
        """
        text = self.prompt_features(encoder, ctx)  # (N, C, D)
        patches = F.normalize(patch_tokens.to(text.device, torch.float32), dim=-1)
        sim = torch.einsum("bmd,ncd->bcmn", patches, text)  # (B, C, M, N)
        flat = sim.reshape(-1, *sim.shape[2:])
        plan = partial_transport_plan(flat, self.eps, self.mass, self.max_iter, self.thresh)
        return (plan * flat).sum(dim=(1, 2)).view(sim.shape[0], sim.shape[1])

    def own_logits(
        self,
        encoder: PromptTextEncoder,
        ctx: torch.Tensor,
        logit_scale: float,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        """``logit_scale`` times the transport scores of ``extras["patch_tokens"]``."""
        return logit_scale * self.transport_scores(encoder, ctx, extras["patch_tokens"])


@dataclass(frozen=True)
class FedOTP(Personalization):
    """Global and local prompts matched to patch tokens by unbalanced OT.

    Attributes:
        eps: Entropic regularisation of the transport.
        mass: Share of the patches' mass the prompts take (FedOTP's ``TOP_PERCENT``).
        max_iter: Most iterations of the solver.
        thresh: Its stopping threshold.
    """

    eps: float = 0.01
    mass: float = 0.8
    max_iter: int = 100
    thresh: float = 1e-3
    name = "fedotp"
    needs_context = True
    personalized = True

    def local_prompt(self, learner: Learner, generator: torch.Generator) -> TransportPrompt:
        """A local context initialised as the global one is."""
        ctx = fresh_context(learner, generator)
        return TransportPrompt(ctx, self.eps, self.mass, self.max_iter, self.thresh)
