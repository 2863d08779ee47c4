"""The prompt-learner interface: trainable prompt tensors on top of a shared frozen backbone."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone


class Learner(torch.nn.Module, abc.ABC):
    """A prompt learner: classifies frozen image features with prompt-derived text features.

    The backbone is held as a plain attribute, not a submodule, so ``parameters()``,
    ``state_dict()`` and ``train()``/``eval()`` concern only the learner's own tensors: the frozen
    model is shared by every site of a process and stays in eval mode. The training loop works on
    cached image features from ``Backbone.encode_images``, since the image tower never changes.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        **hparams: Method-specific hyperparameters, consumed by subclasses.
    """

    name: ClassVar[str]

    def __init__(self, backbone: Backbone, classnames: Sequence[str], **hparams: Any) -> None:
        super().__init__()
        if hparams:
            raise TypeError(f"{type(self).__name__} got unknown hyperparameters {sorted(hparams)}")
        if len(classnames) == 0:
            raise ValueError("classnames is empty")
        self.backbone = backbone
        self.classnames = tuple(classnames)
        self._logit_scale = backbone.logit_scale()

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    @abc.abstractmethod
    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features (C, D) from the current prompt, all classes at once."""

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) = logit_scale * image_features @ text_features.T.

        Args:
            image_features: Frozen, L2-normalised image features (B, D).
        """
        text = self.text_features()
        return self._logit_scale * image_features.to(text.device, text.dtype) @ text.t()

    def loss(self, image_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch; cross-entropy of the logits unless a method adds terms."""
        logits = self(image_features)
        return F.cross_entropy(logits, labels.to(logits.device))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached float32 CPU copies of the trainable tensors: what a site sends to the server."""
        return {
            name: param.detach().to("cpu", torch.float32).clone()
            for name, param in self.named_parameters()
            if param.requires_grad
        }

    def load_trainable_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Overwrites the trainable tensors (e.g. with the server's aggregate).

        Raises:
            ValueError: The keys differ from ``trainable_state()``'s or a shape does not match.
        """
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"{type(self).__name__} trainable state has keys {sorted(state)}, expected "
                f"{sorted(params)} (missing {missing}, unexpected {unexpected})"
            )
        values = {
            name: value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            for name, value in state.items()
        }
        for name, value in values.items():
            expected = tuple(params[name].shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"{type(self).__name__} trainable state key {name!r} has shape "
                    f"{tuple(value.shape)}, expected {expected}"
                )
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def num_trainable(self) -> int:
        """Number of trainable scalars (what each round communicates)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
