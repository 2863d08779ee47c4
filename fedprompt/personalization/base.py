"""What a site keeps to itself: the interface every personalization scheme implements.

A scheme decides which of a learner's tensors are global (they travel to the server and are
aggregated) and which are local (they stay in the site's node state and on its disk), how a
site trains them in a round, and how it scores its own, personalized prompt. The federation
layer asks the scheme; it never reads a learner's internals.

Local tensors live in the learner under ``LOCAL_PREFIX`` (``personal.*`` in its trainable state):
a ``LocalPrompt`` attached to a CoOp-family learner as ``learner.personal`` composes the class
text features from the global context and its own tensors.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedprompt.learners import Learner
from fedprompt.text import PromptTextEncoder

LOCAL_PREFIX = "personal."
"""Trainable-state keys under this prefix are the site's own; they never leave it."""


def split_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(global, local)``: the keys that travel, and the ``personal.*`` keys that stay."""
    local = {k: v for k, v in state.items() if k.startswith(LOCAL_PREFIX)}
    return {k: v for k, v in state.items() if k not in local}, local


class LocalPrompt(torch.nn.Module, abc.ABC):
    """A site's own prompt tensors beside the global context of a CoOp-family learner.

    ``required_inputs`` names the per-image extras its ``own_logits`` needs (as a learner's do);
    a part that has its own logits replaces the method's cross-entropy with its own.
    """

    required_inputs: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def text_features(self, encoder: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor:
        """The site's L2-normalised class text features (C, D) from the global ``ctx``."""

    def extra_loss(self, encoder: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor | None:
        """A term the scheme adds to the method's loss (None: none)."""
        return None

    def own_logits(
        self,
        encoder: PromptTextEncoder,
        ctx: torch.Tensor,
        logit_scale: float,
        **extras: torch.Tensor,
    ) -> torch.Tensor | None:
        """Class logits (B, C) from the ``required_inputs`` (None: the method's own logits)."""
        return None


class Personalization:
    """A personalization scheme (``personalization=<name>``); ``none`` is plain federation.

    Class attributes the site reads:

    - ``trains_global``: whether the site trains the global prompt (``local_only``: no, it
      trains its own copy and returns the global prompt it received, untouched).
    - ``needs_context``: the scheme splices its own tensors into a CoOp-family context
      (``learner.ctx`` and ``learner.prompt_encoder``), so it composes with those methods only.
    - ``personalized``: whether the site scores a personalized prompt besides the global one.
    """

    name: ClassVar[str] = "none"
    trains_global: ClassVar[bool] = True
    needs_context: ClassVar[bool] = False
    personalized: ClassVar[bool] = False

    def local_prompt(self, learner: Learner, generator: torch.Generator) -> LocalPrompt | None:
        """A fresh local part for ``learner`` (None: the scheme attaches none)."""
        return None

    def describe(self) -> dict[str, Any]:
        """The scheme and its settings (a dataclass scheme's fields), for ``summary.json``."""
        settings = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"name": self.name, **settings}


def fresh_context(learner: Learner, generator: torch.Generator) -> torch.Tensor:
    """A second context shaped and initialised as the learner's own (its words, or N(0, 0.02²))."""
    encoder: PromptTextEncoder = learner.prompt_encoder  # type: ignore[assignment]
    class_specific = learner.ctx.dim() == 3  # type: ignore[union-attr]
    return encoder.init_context(class_specific, generator)


class NoPersonalization(Personalization):
    """One global prompt for every site, as federated prompt learning does by default."""
