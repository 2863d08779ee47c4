"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in the prompt of every class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner
from fedprompt.learners.registry import register_learner
from fedprompt.text import PromptTextEncoder


@register_learner("coop")
class CoOp(Learner):
    """Prompts ``[CLS] ctx_1..ctx_n <class>. [SEP]`` whose context ``ctx`` alone is trained.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        n_ctx: Number of context vectors.
        ctx_init: Words whose embeddings initialise the context when they are ``n_ctx`` tokens
            (CoOp's "a photo of a"); otherwise the context starts random (std 0.02).
        class_specific: One context per class (CoOp's CSC variant) instead of a shared one.
        trim_padding: Run the text tower on the prompts without their common trailing padding
            (same features, far faster for BiomedCLIP's 256-token context).
        text_dropout: The authors' quirk: their trainers keep the whole model in train mode, so
            the text tower's dropout is active on the learned-prompt path while training. Off by
            default (a deterministic frozen tower); never active in eval.
        **hparams: Whatever a subclass left over, handed to ``Learner``, which rejects it naming
            the method actually built (a mistyped key of any CoOp variant's config).
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_specific: bool = False,
        trim_padding: bool = True,
        text_dropout: bool = False,
        **hparams: Any,
    ) -> None:
        super().__init__(backbone, classnames, **hparams)
        self.class_specific = class_specific
        self.prompt_encoder = PromptTextEncoder(
            backbone,
            self.classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            trim=trim_padding,
            text_dropout=text_dropout,
        )
        self.ctx = torch.nn.Parameter(self.prompt_encoder.init_context(class_specific))
        # A personalization's local part (fedprompt.personalization.LocalPrompt), attached by a
        # site: it composes the class features from ``ctx`` and the site's own tensors.
        self.personal: torch.nn.Module | None = None

    def text_features(self) -> torch.Tensor:
        """L2-normalised float32 class text features (C, D) for the current context.

        With a local part attached, the site's personalized features; every loss term of the
        CoOp family reads the features here, so it trains the personalized prompt.
        """
        if self.personal is not None:
            return self.personal.text_features(self.prompt_encoder, self.ctx)
        return F.normalize(self.prompt_encoder.encode(self.ctx).float(), dim=-1)
