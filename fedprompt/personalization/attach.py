"""Attaching a site's local part to its learner, and the loss a site then trains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.learners import Learner
from fedprompt.personalization.base import LOCAL_PREFIX, Personalization

LOCAL_MODULE = LOCAL_PREFIX.rstrip(".")
"""The learner attribute a local part is attached as (``learner.personal``)."""


def attach_local_prompt(
    scheme: Personalization,
    learner: Learner,
    local_state: Mapping[str, torch.Tensor] | None,
    generator: torch.Generator,
) -> bool:
    """Give ``learner`` the scheme's local part, holding ``local_state`` where the site has one.

    Returns whether a part was attached (schemes that keep none attach nothing).

    Raises:
        ValueError: The method has no CoOp-style context the scheme can splice into, or the
            saved local tensors do not fit the learner (another method or class list).
    """
    if not scheme.needs_context:
        return False
    if not (hasattr(learner, "personal") and hasattr(learner, "prompt_encoder")):
        raise ValueError(
            f"personalization={scheme.name} needs a CoOp-family method (a learned context in "
            f"the prompt); method={learner.name} has none."
        )
    part = scheme.local_prompt(learner, generator)
    setattr(learner, LOCAL_MODULE, part)
    if local_state:
        learner.load_trainable_state({**_global_part(learner), **local_state})
    return True


def _global_part(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v for k, v in learner.trainable_state().items() if not k.startswith(LOCAL_PREFIX)}


class LocalLoss(torch.nn.Module):
    """The trainee of a round with a local part: the method's loss plus the part's own term.

    Wraps what ``train_local`` trains (the learner, or FedProx's term around it) the way
    ``ProximalTerm`` does: the same parameters, the loss with the extra term.
    """

    def __init__(self, trainee: Any, learner: Learner) -> None:
        super().__init__()
        self.trainee = trainee
        self.learner = learner
        part = getattr(learner, LOCAL_MODULE)
        self.required_inputs = part.required_inputs or getattr(
            trainee, "required_inputs", learner.required_inputs
        )

    @property
    def backbone(self) -> Any:
        """The learner's frozen backbone."""
        return self.learner.backbone

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """The wrapped loss plus the local part's term (where it has one).

        A part with its own logits (FedOTP's transport scores) replaces the method's loss by the
        cross-entropy of those logits: the configuration allows it for CoOp only, whose loss is
        exactly that cross-entropy of its own logits.
        """
        part = getattr(self.learner, LOCAL_MODULE)
        encoder, ctx = self.learner.prompt_encoder, self.learner.ctx
        own = part.own_logits(encoder, ctx, self.learner.backbone.logit_scale(), **extras)
        if own is not None:
            loss = F.cross_entropy(own, labels.to(own.device))
        else:
            loss = self.trainee.loss(image_features, labels, **extras)
        extra = part.extra_loss(encoder, ctx)
        return loss if extra is None else loss + extra
