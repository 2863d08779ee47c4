"""Exact DP-SGD: each record's gradient with respect to the learner's trainable tensors.

Valid for every learner whose private loss is a mean of per-record terms, image-conditioned
prompts included. Opacus' own per-sample machinery cannot serve here: its module hooks need the
batch to flow through the layer that owns the parameter, and a prompt context is a bare
``nn.Parameter`` that the batch never passes through; its functorch mode would differentiate the
frozen encoder's weights too. So the per-record gradients come from ``torch.func``
(``vmap(grad_and_value(...))`` over a batch of one record, with the learner's tensors as the
only differentiated inputs) and are handed to Opacus as ``p.grad_sample``; Opacus'
``DPOptimizer`` then clips, sums, noises and accounts exactly as for any Opacus model. A
plain loop over records is the fallback where a learner's loss cannot run under ``vmap``.
Either way a step costs about B backward passes through the text encoder.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from opacus.optimizers import DPOptimizer
from torch.func import functional_call, grad_and_value, vmap

from fedprompt.learners import Learner
from fedprompt.privacy.loss_split import private_loss
from fedprompt.privacy.noisy_aggregation import noisy_aggregator, release_per_sample_state

logger = logging.getLogger(__name__)

PerSampleMethod = Literal["auto", "vmap", "loop"]
# torch's batching fallback for some backward kernels (SDPA on the CPU) is correct, only slower.
_SLOW_BATCHING_WARNING = "There is a performance drop because we have not yet implemented"


class _OneRecordLoss(torch.nn.Module):
    """The learner's private loss on one record, as a module ``functional_call`` can rebind."""

    def __init__(self, learner: Learner) -> None:
        super().__init__()
        self.learner = learner

    def forward(
        self, image_features: torch.Tensor, labels: torch.Tensor, extras: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        one = {name: value.unsqueeze(0) for name, value in extras.items()}
        return private_loss(self.learner, image_features.unsqueeze(0), labels.unsqueeze(0), one)


def trainable_parameters(learner: Learner) -> dict[str, torch.nn.Parameter]:
    """The learner's trainable tensors by name (what the server averages)."""
    return {name: p for name, p in learner.named_parameters() if p.requires_grad}


def per_sample_gradients(
    learner: Learner,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    extras: dict[str, torch.Tensor] | None = None,
    *,
    method: PerSampleMethod = "vmap",
    chunk_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients (B, *shape) of each record's private loss per trainable tensor, and the losses.

    Args:
        learner: The learner; its private loss is evaluated on batches of one record.
        image_features: (B, D) frozen image features.
        labels: (B,) class ids.
        extras: The learner's extra inputs, one row per record.
        method: ``vmap`` (one batched backward) or ``loop`` (one backward per record).
        chunk_size: Records per ``vmap`` chunk, to bound memory; ``None``: all at once.
    """
    extras = extras or {}
    params = trainable_parameters(learner)
    count = len(labels)
    if count == 0:
        empty = {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
        return empty, image_features.new_zeros(0)
    if method == "loop":
        return _loop_gradients(learner, params, image_features, labels, extras)
    if method != "vmap":
        raise ValueError(f"Unknown per-sample gradient method {method!r}; use vmap or loop.")
    module = _OneRecordLoss(learner)
    detached = {f"learner.{name}": p.detach() for name, p in params.items()}

    def record_loss(
        weights: dict[str, torch.Tensor],
        features: torch.Tensor,
        label: torch.Tensor,
        record_extras: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        return functional_call(module, weights, (features, label, record_extras))

    batched = vmap(
        grad_and_value(record_loss),
        in_dims=(None, 0, 0, 0),
        randomness="different",
        chunk_size=chunk_size,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SLOW_BATCHING_WARNING)
        grads, losses = batched(detached, image_features, labels, extras)
    return {name: grads[f"learner.{name}"] for name in params}, losses.detach()


def _loop_gradients(
    learner: Learner,
    params: dict[str, torch.nn.Parameter],
    image_features: torch.Tensor,
    labels: torch.Tensor,
    extras: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward and backward per record: slow, but runs any loss autograd can differentiate."""
    names = list(params)
    per_record: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    losses = []
    for row in range(len(labels)):
        one = {name: value[row : row + 1] for name, value in extras.items()}
        loss = private_loss(learner, image_features[row : row + 1], labels[row : row + 1], one)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            per_record[name].append(torch.zeros_like(params[name]) if grad is None else grad)
        losses.append(loss.detach())
    return {name: torch.stack(g) for name, g in per_record.items()}, torch.stack(losses)


class ExactClipping:
    """Clipped, noised gradients from exact per-record gradients of the trainable tensors.

    Args:
        learner: Any learner whose private loss is a mean of per-record terms.
        noise_multiplier: Noise std over the clipping norm.
        max_grad_norm: Clipping norm of each record's gradient over all trainable tensors.
        expected_batch_size: q * n, the divisor of the noisy sum.
        noise_generator: Source of the Gaussian noise, on the learner's device.
        step_hook: Called once per noisy step (the ledger's accountant hook).
        method: ``auto`` tries ``vmap`` and falls back to ``loop`` (logged once) where the
            learner's loss cannot run under ``vmap``.
        chunk_size: Records per ``vmap`` chunk; ``None``: the whole batch at once.
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
        method: PerSampleMethod = "auto",
        chunk_size: int | None = None,
    ) -> None:
        self.learner = learner
        self.params = trainable_parameters(learner)
        self.method: PerSampleMethod = method
        self.chunk_size = chunk_size
        self.optimizer = noisy_aggregator(
            self.params.values(),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            noise_generator=noise_generator,
            step_hook=step_hook,
        )

    def _gradients(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.method == "auto":
            try:
                result = per_sample_gradients(
                    self.learner, image_features, labels, extras, chunk_size=self.chunk_size
                )
            except RuntimeError as error:
                logger.warning(
                    "%s's loss cannot run under torch.func.vmap (%s); exact DP clipping falls "
                    "back to one backward pass per record.",
                    type(self.learner).__name__,
                    str(error).splitlines()[0],
                )
                self.method = "loop"
            else:
                self.method = "vmap"
                return result
        return per_sample_gradients(
            self.learner,
            image_features,
            labels,
            extras,
            method=self.method,
            chunk_size=self.chunk_size,
        )

    def private_gradient(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Sets the trainable ``.grad`` to the noisy mean of clipped per-record gradients.

        The inputs are on the learner's device already (``dp_training`` moves them once).
        """
        grads, losses = self._gradients(image_features, labels, extras)
        self.optimizer.zero_grad(set_to_none=True)
        for name, param in self.params.items():
            param.grad_sample = grads[name].detach()
        self.optimizer.pre_step()
        return losses.sum()

    def close(self) -> None:
        """Removes the per-sample attributes Opacus left on the learner's tensors."""
        release_per_sample_state(self.params.values())
