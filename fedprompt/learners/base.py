"""The prompt-learner interface: trainable prompt tensors on top of a shared frozen backbone."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.text import PromptTextEncoder

EXTRA_INPUTS: dict[str, str] = {
    "views": "float (B, V, D): L2-normalised features of V cached augmented views of each image",
    "patch_tokens": "float (B, P, D): patch tokens of the frozen ViT, projected to the joint space",
}


class Learner(torch.nn.Module, abc.ABC):
    """A prompt learner: classifies frozen image features with prompt-derived text features.

    The backbone is held as a plain attribute, not a submodule, so ``parameters()``,
    ``state_dict()`` and ``train()``/``eval()`` concern only the learner's own tensors: the frozen
    model is shared by every site of a process and stays in eval mode. The training loop works on
    cached image features from ``Backbone.encode_images``, since the image tower never changes.

    Class attributes a training loop, federation or privacy layer reads:

    - ``required_inputs``: names of the extra per-image tensors ``loss`` needs besides the pooled
      features, passed as keyword arguments ``loss(features, labels, **extras)`` and aligned with
      the batch. Known names (see ``EXTRA_INPUTS``): ``"views"``, float (B, V, D), the
      L2-normalised features of V cached augmented views of each image; ``"patch_tokens"``,
      float (B, P, D) patch tokens of the frozen ViT in the joint space (as
      ``Backbone.encode_image_tokens`` gives them; (B, P, width) trunk tokens are projected).
      ``forward`` never takes extras, so evaluation needs only pooled features.
    - ``needs_training``: False for a learner with nothing to train (zero-shot): its
      ``trainable_state()`` is ``{}``, and sites skip local training and need no training data.
    - ``text_feature_only``: every loss term reaches the trainable tensors only through the class
      text-feature matrix ``text_features()`` (C, D), so a per-sample gradient can be taken (and
      clipped) in that space and pushed into the prompt with one backward pass.
    - ``per_sample_loss``: the batch loss is the mean of per-sample terms, each depending on its
      own image (and on public data) only, so one sample's influence is bounded by clipping its
      term. Both flags must hold for text-feature-space differential privacy. The defaults fit
      CoOp's cross-entropy; a method whose loss breaks either property sets it to False.
    - ``record_loss_note``: for a method whose batch loss couples the records of a batch
      (``per_sample_loss`` False), how its loss differs when taken on one record at a time, as
      exact DP-SGD does (e.g. "the teacher's outlier filter is computed per image"). Each
      record's gradient then depends on that record alone, so clipping bounds its influence.
      None: the method cannot train with DP-SGD.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        **hparams: Method-specific hyperparameters, consumed by subclasses.
    """

    name: ClassVar[str]
    required_inputs: ClassVar[tuple[str, ...]] = ()
    needs_training: ClassVar[bool] = True
    text_feature_only: ClassVar[bool] = True
    per_sample_loss: ClassVar[bool] = True
    record_loss_note: ClassVar[str | None] = None

    def __init__(self, backbone: Backbone, classnames: Sequence[str], **hparams: Any) -> None:
        super().__init__()
        if hparams:
            raise TypeError(f"{type(self).__name__} got unknown hyperparameters {sorted(hparams)}")
        if len(classnames) == 0:
            raise ValueError("classnames is empty")
        self.backbone = backbone
        self.classnames = tuple(classnames)
        self._logit_scale = backbone.logit_scale()

    def train(self, mode: bool = True) -> Learner:
        """Train or eval mode, passed on to the learner's prompt encoders.

        The encoders are plain objects, not submodules; with ``text_dropout`` they run the frozen
        text tower with dropout during training only.
        """
        super().train(mode)
        for value in vars(self).values():
            if isinstance(value, PromptTextEncoder):
                value.training = mode
        return self

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

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """Training loss of a batch; cross-entropy of the logits unless a method adds terms.

        Args:
            image_features: Frozen, L2-normalised image features (B, D).
            labels: Class ids (B,).
            **extras: The tensors named in ``required_inputs``, one row per image.
        """
        self.check_extras(extras)
        logits = self(image_features)
        return F.cross_entropy(logits, labels.to(logits.device))

    def check_extras(self, extras: Mapping[str, torch.Tensor]) -> None:
        """Checks that ``extras`` holds exactly the inputs named in ``required_inputs``.

        Raises:
            ValueError: A required input is missing; the message says who supplies it.
            TypeError: An input the learner does not use was passed.
        """
        missing = [name for name in self.required_inputs if name not in extras]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the extra inputs {missing} in loss() (its "
                f"required_inputs); the training loop must cache and pass them, e.g. "
                f"learner.loss(features, labels, {missing[0]}=...)"
            )
        unexpected = sorted(set(extras) - set(self.required_inputs))
        if unexpected:
            raise TypeError(
                f"{type(self).__name__}.loss() got extra inputs {unexpected} it does not use; "
                f"it uses {list(self.required_inputs)}"
            )

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
