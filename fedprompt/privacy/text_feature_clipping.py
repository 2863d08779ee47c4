"""DP-SGD with per-record clipping in the space of the class text features T (C x D).

Where every private loss term reaches the prompt only through T = text_features(prompt), one
record's gradient with respect to the prompt is J^T g_i, with J the Jacobian of the frozen text
encoder and g_i = dL_i/dT. Clipping g_i to norm c and adding N(0, sigma^2 c^2) noise to their
sum is the Gaussian mechanism on T-gradients, with the same sensitivity, noise multiplier,
sampling rate and accountant as DP-SGD (Abadi et al., CCS 2016); the noisy sum is then pushed
into the prompt by one backward pass through the frozen encoder, which is post-processing and
costs nothing in privacy. A step thus costs one encoder forward and backward, as a non-private
step does, instead of one backward per record.

Opacus does the per-record part: T is copied each step into the weight of an ``nn.Linear``
head wrapped in a ``GradSampleModule``, so ``head(x) = x @ T.T`` and Opacus' own Linear grad
sampler gives each record's dL_i/dT; its ``DPOptimizer`` clips, sums, noises and accounts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedprompt.learners import Learner
from fedprompt.privacy.loss_split import private_sample_losses
from fedprompt.privacy.noisy_aggregation import noisy_aggregator, release_per_sample_state


class TextFeatureClipping:
    """Clipped, noised prompt gradients via per-record clipping of dL/dT.

    Args:
        learner: A learner whose private loss depends on its tensors only through
            ``text_features()`` (``text_feature_only``).
        noise_multiplier: Noise std over the clipping norm.
        max_grad_norm: Clipping norm c of each record's dL/dT (Frobenius norm).
        expected_batch_size: q * n, the divisor of the noisy sum.
        noise_generator: Source of the Gaussian noise, on the learner's device.
        step_hook: Called once per noisy step (the ledger's accountant hook).
    """

    def __init__(
        self,
        learner: Learner,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise_generator: torch.Generator | None,
        step_hook: Callable[[DPOptimizer], None],
    ) -> None:
        self.learner = learner
        self.trainable = [p for p in learner.parameters() if p.requires_grad]
        head = torch.nn.Linear(
            learner.backbone.embed_dim,
            learner.num_classes,
            bias=False,
            device=learner.backbone.device,
        )
        self.head = GradSampleModule(head, loss_reduction="sum")
        self.weight = head.weight
        self.optimizer = noisy_aggregator(
            [self.weight],
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            noise_generator=noise_generator,
            step_hook=step_hook,
        )

    def noisy_text_feature_gradient(
        self,
        text_features: torch.Tensor,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy mean gradient with respect to T (C, D), and the per-record losses (B,).

        ``labels`` and ``extras`` go to the learner's ``private_sample_losses`` (cross-entropy
        by default); the losses are summed (``loss_reduction="sum"``), so an empty Poisson batch
        is still a valid, noised and accounted step.
        """
        with torch.no_grad():
            self.weight.copy_(text_features.detach())  # copy_ casts to the head's dtype
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.trainable:
            param.grad = None
        image_features = image_features.to(dtype=self.weight.dtype)
        similarities = self.head(image_features)
        losses = private_sample_losses(self.learner, similarities, labels, image_features, extras)
        with warnings.catch_warnings():
            # The head's input (frozen features) needs no gradient; Opacus' hook still fires.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        if any(param.grad is not None for param in self.trainable):
            raise ValueError(
                f"{type(self.learner).__name__}.private_sample_losses reaches the prompt other "
                "than through the similarities, which text-feature clipping cannot bound; set "
                "privacy.clipping=exact or use only the similarities."
            )
        self.optimizer.pre_step()
        assert self.weight.grad is not None
        return self.weight.grad.detach(), losses.detach()

    def private_gradient(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Sets the learner's trainable ``.grad`` to J^T (noisy dL/dT); returns the loss sum."""
        text = self.learner.text_features()
        noisy, losses = self.noisy_text_feature_gradient(text, image_features, labels, extras)
        # autograd casts the head's float32 gradient to the text features' own dtype.
        grads = torch.autograd.grad(text, self.trainable, grad_outputs=noisy, allow_unused=True)
        for param, grad in zip(self.trainable, grads, strict=True):
            param.grad = torch.zeros_like(param) if grad is None else grad
        return losses.sum()

    def close(self) -> None:
        """Removes Opacus' hooks and per-sample attributes."""
        self.head.remove_hooks()
        release_per_sample_state([self.weight])
