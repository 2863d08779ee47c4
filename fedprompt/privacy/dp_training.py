"""A site's local training under sample-level DP-SGD, counted against its privacy ledger."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedprompt.learners import Learner
from fedprompt.lr_schedule import LRSchedule, run_epoch, set_lr
from fedprompt.privacy.calibration import steps_per_epoch
from fedprompt.privacy.ledger import SiteLedger
from fedprompt.privacy.loss_split import public_loss, resolve_clipping
from fedprompt.privacy.noisy_aggregation import PrivateGradient
from fedprompt.privacy.per_sample_gradients import ExactClipping
from fedprompt.privacy.text_feature_clipping import TextFeatureClipping
from fedprompt.training import TrainStats, gather_patch_tokens, make_optimizer, required_inputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DPTrainStats(TrainStats):
    """``TrainStats`` of a DP round, with the site's privacy spent so far.

    ``loss`` (the mean private loss over the sampled records) is not covered by the DP guarantee
    and should stay at the site; ``metrics()`` holds what may leave it.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    total_steps: int
    clipping: str
    budget_exhausted: bool

    def metrics(self) -> dict[str, float | int]:
        """Scalars for the site's reply and ``metrics.jsonl`` (no string, as Flower asks)."""
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.total_steps,
            "dp-budget-exhausted": int(self.budget_exhausted),
        }


def privacy_summary(metrics: Mapping[str, Any], accountant: str) -> dict[str, float | int | str]:
    """A site's ``summary.json`` privacy entry from its last ``DPTrainStats.metrics()``.

    The server never holds a site's ledger; it has the scalars each site reported, and the
    accountant's name from the run's config (Flower metric records hold no strings).
    """
    return {
        "epsilon": float(metrics["dp-epsilon"]),
        "delta": float(metrics["dp-delta"]),
        "noise_multiplier": float(metrics["dp-noise-multiplier"]),
        "sample_rate": float(metrics["dp-sample-rate"]),
        "steps": int(metrics["dp-steps"]),
        "accountant": accountant,
    }


def _generators(
    seed: int, deterministic: bool, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """Generators for Poisson sampling (CPU) and noise (on ``device``).

    Unless ``deterministic``, both are seeded from the operating system's entropy: amplification
    by subsampling and the Gaussian mechanism both assume that whoever sees the prompt cannot
    reproduce the draws, and the run's ``seed`` is written in its config.
    """
    if deterministic:
        sampling_seed, noise_seed = np.random.SeedSequence([seed, 0xD9]).generate_state(2)
    else:
        sampling_seed, noise_seed = (int.from_bytes(os.urandom(8), "little") for _ in range(2))
    sampling = torch.Generator().manual_seed(int(sampling_seed))
    noise = torch.Generator(device=device).manual_seed(int(noise_seed))
    return sampling, noise


def dp_train_local(
    learner: Learner,
    features: torch.Tensor,
    labels: torch.Tensor,
    train_cfg: Mapping[str, Any],
    privacy_cfg: Mapping[str, Any],
    ledger: SiteLedger,
    seed: int,
    *,
    patch_tokens: Sequence[torch.Tensor] | None = None,
    server_round: int = 1,
    num_rounds: int = 1,
) -> DPTrainStats:
    """``fedprompt.training.train_local`` with sample-level DP-SGD (Abadi et al., CCS 2016).

    Each step draws a Poisson batch (every record independently with the ledger's rate q, via
    Opacus' ``UniformWithReplacementSampler``; floor(1/q) steps an epoch), computes the private
    gradient in the configured clipping mode, adds the gradient of the learner's public loss
    terms (``public_loss()``, e.g. SCCM against public class descriptions: no private record,
    so neither clipped nor noised), and steps the learner's optimizer. The ledger's accountant
    records every noisy step. If the round's steps would take the site past its budget, it
    trains nothing and says so (``budget_exhausted``); the learner is left unchanged.

    Args:
        learner: The learner to train.
        features: Cached L2-normalised features, (N, D) or (N, V, D) for V cached views; a
            sampled record feeds one seeded random view.
        labels: Labels (N,).
        train_cfg: The ``train`` section (optimizer, lr, local_epochs, ...); the batch size is
            the ledger's q * N.
        privacy_cfg: The ``privacy`` section: ``max_grad_norm``, ``clipping`` (``auto``,
            ``text_features``, ``exact``), ``exact_chunk_size``, ``deterministic``.
        ledger: The site's ledger for the whole run.
        seed: Seed of the view choice, and of sampling and noise where ``deterministic``.
        patch_tokens: Per view, patch tokens (N, P, Dp), for learners that need them.
        server_round: This round's number (1-based); with ``num_rounds`` it fixes each epoch's
            rate on the run's schedule, exactly as ``train_local`` does.
        num_rounds: Planned rounds of the run (``federation.rounds``).

    Raises:
        ValueError: The ledger was planned for another number of records, or the learner has
            nothing to train or cannot train privately in the requested mode.
        FloatingPointError: The private loss became NaN or infinite.
    """
    start = time.perf_counter()
    count = len(labels)
    if count != ledger.num_records:
        raise ValueError(
            f"The site holds {count} training records but its privacy ledger was planned for "
            f"{ledger.num_records}; the sampling rate and epsilon would be wrong."
        )
    if not any(p.requires_grad for p in learner.parameters()):
        raise ValueError(f"{type(learner).__name__} has nothing to train; skip its local training.")
    clipping = resolve_clipping(learner, str(privacy_cfg.get("clipping", "auto")))
    if not learner.per_sample_loss:  # resolve_clipping refused it unless it has a note
        logger.info(
            "%s under DP-SGD, one record at a time: %s.",
            type(learner).__name__,
            learner.record_loss_note,
        )
    local_epochs = int(train_cfg["local_epochs"])
    round_steps = ledger.steps_per_round(local_epochs)

    def stats(loss: float, steps: int, epsilon: float, exhausted: bool) -> DPTrainStats:
        return DPTrainStats(
            loss=loss,
            num_examples=count,
            steps=steps,
            seconds=time.perf_counter() - start,
            epsilon=epsilon,
            delta=ledger.delta,
            noise_multiplier=ledger.noise_multiplier,
            sample_rate=ledger.sample_rate,
            total_steps=ledger.steps,
            clipping=clipping,
            budget_exhausted=exhausted,
        )

    # The epsilon after this round, were it taken (one accountant evaluation per round).
    epsilon_after = ledger.epsilon(extra_steps=round_steps)
    if epsilon_after > ledger.target_epsilon:
        return stats(0.0, 0, ledger.epsilon(), exhausted=True)

    cached = features if features.dim() == 3 else features.unsqueeze(1)
    num_views = cached.shape[1]
    needs = required_inputs(learner)
    if "patch_tokens" in needs and patch_tokens is None:
        raise ValueError(
            f"{type(learner).__name__} needs patch tokens but none were cached for this site."
        )
    device = learner.backbone.device
    sampling, noise = _generators(seed, bool(privacy_cfg.get("deterministic")), device)
    views_generator = torch.Generator().manual_seed(seed)
    settings: dict[str, Any] = {
        "noise_multiplier": ledger.noise_multiplier,
        "max_grad_norm": float(privacy_cfg.get("max_grad_norm", 1.0)),
        "expected_batch_size": max(1, round(ledger.sample_rate * count)),
        "noise_generator": noise,
        "step_hook": ledger.optimizer_hook(),
    }
    clipper: PrivateGradient
    if clipping == "text_features":
        clipper = TextFeatureClipping(learner, **settings)
    else:
        chunk = privacy_cfg.get("exact_chunk_size")
        clipper = ExactClipping(
            learner, chunk_size=None if chunk is None else int(chunk), **settings
        )
    optimizer = make_optimizer(learner, train_cfg)
    schedule = LRSchedule.from_config(train_cfg, num_rounds)
    sampler = UniformWithReplacementSampler(
        num_samples=count,
        sample_rate=ledger.sample_rate,
        generator=sampling,
        steps=steps_per_epoch(ledger.sample_rate),
    )
    cached = cached.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    steps_before = ledger.steps
    loss_sum, sampled = 0.0, 0
    learner.train()
    try:
        batches_per_epoch = steps_per_epoch(ledger.sample_rate)
        for local_epoch in range(local_epochs):
            epoch_of_run = run_epoch(server_round, local_epoch, local_epochs)
            for batch, indices in enumerate(sampler):
                set_lr(optimizer, schedule.rate_of_batch(epoch_of_run, batch, batches_per_epoch))
                rows = torch.as_tensor(indices, dtype=torch.long)
                views = torch.randint(num_views, (len(rows),), generator=views_generator)
                rows_on_device, views_on_device = rows.to(device), views.to(device)
                extras: dict[str, torch.Tensor] = {}
                if "views" in needs:
                    extras["views"] = cached[rows_on_device]
                if "patch_tokens" in needs and patch_tokens is not None:
                    extras["patch_tokens"] = gather_patch_tokens(patch_tokens, rows, views, device)
                # The clipper sets every trainable tensor's .grad afresh; no zero_grad needed.
                batch_loss = clipper.private_gradient(
                    cached[rows_on_device, views_on_device], labels[rows_on_device], extras
                )
                public = public_loss(learner)
                if public is not None:
                    public.backward()
                optimizer.step()
                loss_sum += float(batch_loss)
                sampled += len(rows)
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(
                        f"The private training loss became {loss_sum} at step "
                        f"{ledger.steps - steps_before}; lower train.lr."
                    )
    finally:
        clipper.close()
        learner.eval()
    taken = ledger.steps - steps_before
    if taken != round_steps:
        raise RuntimeError(
            f"The privacy ledger recorded {taken} noisy steps this round but {round_steps} were "
            "taken; the reported epsilon would be wrong."
        )
    return stats(loss_sum / max(sampled, 1), taken, epsilon_after, exhausted=False)
