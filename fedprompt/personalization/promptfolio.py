"""PromptFolio (Pan et al., NeurIPS 2024): a global and a local prompt, mixed per site.

Each site holds two contexts, the global one (aggregated) and its own; the class text features
are the mix ``(1 - mix) * f(global) + mix * f(local)`` of the two prompts' L2-normalised features,
not normalised again (PromptFolio's ``trainers/PromptFolio.py``: ``frac`` 0 is fully global, 1
fully local). Both contexts train on the site's cross-entropy; only the global one travels.
``mix`` defaults to 0.4, PromptFolio's ``--frac_p`` default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedprompt.learners import Learner
from fedprompt.personalization.base import LocalPrompt, Personalization, fresh_context
from fedprompt.text import PromptTextEncoder


class FolioPrompt(LocalPrompt):
    """The site's own context, mixed with the global one's features.

    Args:
        ctx: The initial local context, shaped as the learner's.
        mix: Weight of the local prompt's features.
    """

    def __init__(self, ctx: torch.Tensor, mix: float) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(ctx)
        self.mix = mix

    def text_features(self, encoder: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor:
        """``(1 - mix) * f(global) + mix * f(local)``, each L2-normalised, the sum not."""
        shared = F.normalize(encoder.encode(ctx).float(), dim=-1)
        own = F.normalize(encoder.encode(self.ctx).float(), dim=-1)
        return (1.0 - self.mix) * shared + self.mix * own


@dataclass(frozen=True)
class PromptFolio(Personalization):
    """A prompt portfolio per site.

    Attributes:
        mix: Weight of the local prompt (PromptFolio's ``frac``), in [0, 1].
    """

    mix: float = 0.4
    name = "promptfolio"
    needs_context = True
    personalized = True

    def local_prompt(self, learner: Learner, generator: torch.Generator) -> FolioPrompt:
        """A local context initialised as the global one is (the same words, or N(0, 0.02²))."""
        return FolioPrompt(fresh_context(learner, generator), self.mix)
