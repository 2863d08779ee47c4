"""Opacus' DPOptimizer as the clip, sum, noise and account stage shared by both clipping modes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from opacus.optimizers import DPOptimizer


class PrivateGradient(Protocol):
    """Sets the learner's trainable ``.grad`` to the clipped, noised private gradient of a batch."""

    def private_gradient(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Returns the summed private loss of the batch (detached), for reporting at the site."""
        ...

    def close(self) -> None:
        """Removes the per-sample attributes Opacus left on the tensors."""
        ...


def noisy_aggregator(
    params: Iterable[torch.nn.Parameter],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    noise_generator: torch.Generator | None,
    step_hook: Callable[[DPOptimizer], None],
) -> DPOptimizer:
    """A ``DPOptimizer`` used only for its ``pre_step``: clip, sum, noise, scale, account.

    Its ``pre_step`` clips each record's gradient (``p.grad_sample``) to ``max_grad_norm``, sums
    them, adds N(0, (noise_multiplier * max_grad_norm)^2) noise (Abadi et al., CCS 2016), divides
    by ``expected_batch_size`` (Poisson batches vary in size; dividing by the expected one keeps
    the sensitivity fixed) and calls ``step_hook`` (the ledger's accountant). The learner's own
    optimizer then steps on that gradient, so momentum or Adam are post-processing; the wrapped
    zero-learning-rate SGD is never stepped.

    Noise uses Opacus' ``secure_mode`` draw (a sum of four Gaussians, the floating-point attack
    mitigation of Holohan and Braghin 2021) from ``noise_generator``.
    """
    if not max_grad_norm > 0:
        raise ValueError(f"privacy.max_grad_norm must be positive, got {max_grad_norm}.")
    optimizer = DPOptimizer(
        torch.optim.SGD(list(params), lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=True,
    )
    optimizer.attach_step_hook(step_hook)
    return optimizer


def release_per_sample_state(params: Iterable[torch.nn.Parameter]) -> None:
    """Deletes the ``grad_sample`` and ``summed_grad`` attributes Opacus sets on parameters."""
    for param in params:
        for name in ("grad_sample", "summed_grad"):
            if hasattr(param, name):
                delattr(param, name)
