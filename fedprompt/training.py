"""Local optimisation and evaluation of a learner on frozen image features."""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedprompt.evaluation.metrics import ClassificationMetrics, classification_metrics
from fedprompt.learners import Learner
from fedprompt.lr_schedule import LRSchedule, run_epoch, set_lr

SUPPORTED_INPUTS: tuple[str, ...] = ("views", "patch_tokens")
"""Extra inputs this loop can pass to a learner's ``loss``: all cached views (B, V, D) of each
image, and the frozen image tower's patch tokens (B, P, Dp) of the view fed this step."""


@dataclass(frozen=True)
class TrainStats:
    """What a site reports about its local training: never per-image values."""

    loss: float
    num_examples: int
    steps: int
    seconds: float


def make_optimizer(learner: Learner, train_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD (the papers' choice) or AdamW over the learner's trainable tensors only."""
    params = [p for p in learner.parameters() if p.requires_grad]
    name = str(train_cfg.get("optimizer", "sgd")).lower()
    lr = float(train_cfg["lr"])
    weight_decay = float(train_cfg.get("weight_decay", 0.0))
    if name == "sgd":
        momentum = float(train_cfg.get("momentum", 0.9))
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; set train.optimizer to 'sgd' or 'adamw'.")


def required_inputs(learner: Learner) -> tuple[str, ...]:
    """The extra inputs a learner's ``loss`` takes (its ``required_inputs``), checked.

    Raises:
        ValueError: The learner asks for an input the training loop cannot provide.
    """
    needs = tuple(getattr(learner, "required_inputs", ()))
    unknown = sorted(set(needs) - set(SUPPORTED_INPUTS))
    if unknown:
        raise ValueError(
            f"{type(learner).__name__} asks for inputs {unknown}; the training loop provides "
            f"only {list(SUPPORTED_INPUTS)}."
        )
    return needs


def gather_patch_tokens(
    patch_tokens: Sequence[torch.Tensor],
    rows: torch.Tensor,
    views: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """float32 patch tokens (B, P, Dp) of image ``rows[i]`` in view ``views[i]``, on ``device``."""
    first = patch_tokens[0]
    out = torch.empty((len(rows), *first.shape[1:]), dtype=torch.float32)
    for view in views.unique().tolist():
        chosen = views == view
        out[chosen] = patch_tokens[view][rows[chosen]].float()
    if device.type == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out


def train_local(
    learner: Learner,
    features: torch.Tensor,
    labels: torch.Tensor,
    train_cfg: Mapping[str, Any],
    seed: int,
    *,
    patch_tokens: Sequence[torch.Tensor] | None = None,
    server_round: int = 1,
    num_rounds: int = 1,
) -> TrainStats:
    """Run ``train.local_epochs`` epochs of mini-batch training; returns the mean training loss.

    Each epoch visits the images in a seeded random order and, where several augmented views
    are cached, feeds one seeded random view per image as ``image_features``; the extras the
    learner lists in ``required_inputs`` are passed to its ``loss`` as keyword arguments. The
    site's features move to the learner's device once, not per step. The optimizer is created
    afresh each round, as a site receives a new global prompt each round; its rate at each step
    is the run's schedule at that epoch, or batch under ``train.lr_step=batch`` (``LRSchedule``),
    counted from the round number, so round ``r`` continues where round ``r - 1`` stopped, also
    after a resume.

    Args:
        learner: The learner to train.
        features: Cached L2-normalised features, (N, D) for one view or (N, V, D) for V views.
        labels: Labels (N,).
        train_cfg: The ``train`` config section (optimizer, lr, batch size, epochs).
        seed: Seed of the batch order and view choice.
        patch_tokens: Per view, patch tokens (N, P, Dp) (any float dtype, on the CPU); needed
            only by learners that list ``patch_tokens``.
        server_round: This round's number (1-based), which places its epochs in the run.
        num_rounds: Planned rounds of the run (``federation.rounds``), the schedule's span.

    Raises:
        ValueError: No training images, or an input the learner needs is missing.
        FloatingPointError: The loss became NaN or infinite.
    """
    start = time.perf_counter()
    if len(labels) == 0:
        raise ValueError("This site has no training images; check the partition and train.shots.")
    cached = features if features.dim() == 3 else features.unsqueeze(1)
    count, num_views = cached.shape[0], cached.shape[1]
    needs = required_inputs(learner)
    if "patch_tokens" in needs and patch_tokens is None:
        raise ValueError(
            f"{type(learner).__name__} needs patch tokens but none were cached for this site."
        )
    if patch_tokens is not None and len(patch_tokens) != num_views:
        raise ValueError(f"Got patch tokens for {len(patch_tokens)} views but {num_views} views.")
    optimizer = make_optimizer(learner, train_cfg)
    schedule = LRSchedule.from_config(train_cfg, num_rounds)
    local_epochs = int(train_cfg["local_epochs"])
    batch_size = int(train_cfg["batch_size"])
    generator = torch.Generator().manual_seed(seed)
    device = learner.backbone.device
    cached = cached.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    learner.train()
    losses: list[torch.Tensor] = []
    total = 0.0
    batches_per_epoch = math.ceil(count / batch_size)
    for local_epoch in range(local_epochs):
        epoch_of_run = run_epoch(server_round, local_epoch, local_epochs)
        order = torch.randperm(count, generator=generator)
        if num_views > 1:
            chosen = torch.randint(num_views, (count,), generator=generator)
        else:
            chosen = torch.zeros(count, dtype=torch.long)
        order_on_device = order.to(device, non_blocking=True)
        chosen_on_device = chosen.to(device, non_blocking=True)
        first_step = len(losses)
        for batch, begin in enumerate(range(0, count, batch_size)):
            set_lr(optimizer, schedule.rate_of_batch(epoch_of_run, batch, batches_per_epoch))
            rows = order_on_device[begin : begin + batch_size]
            extras: dict[str, torch.Tensor] = {}
            if "views" in needs:
                extras["views"] = cached[rows]
            if "patch_tokens" in needs and patch_tokens is not None:
                cpu_rows = order[begin : begin + batch_size]
                extras["patch_tokens"] = gather_patch_tokens(
                    patch_tokens, cpu_rows, chosen[cpu_rows], device
                )
            loss = learner.loss(cached[rows, chosen_on_device[rows]], labels[rows], **extras)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        # One device sync per epoch instead of one per step.
        epoch = torch.stack(losses[first_step:]).cpu()
        finite = torch.isfinite(epoch)
        if not finite.all():
            step = first_step + int((~finite).nonzero()[0])
            raise FloatingPointError(
                f"The training loss became {epoch[step - first_step].item()} at step {step}; "
                "lower train.lr."
            )
        total += sum(epoch.tolist())
    learner.eval()
    steps = len(losses)
    return TrainStats(
        loss=total / max(steps, 1),
        num_examples=count,
        steps=steps,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def predict(
    learner: Learner, features: torch.Tensor, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class ids and class probabilities for frozen image features.

    The ids are the argmax of the learner's logits, the probabilities their softmax (float64,
    (N, C)), which calibration needs; in batches to bound memory.
    """
    learner.eval()
    device = learner.backbone.device
    ids, probabilities = [], []
    for begin in range(0, len(features), batch_size):
        logits = learner(features[begin : begin + batch_size].to(device, non_blocking=True))
        ids.append(logits.argmax(dim=1).cpu())
        probabilities.append(torch.softmax(logits.double(), dim=1).cpu())
    if not ids:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float64)
    return torch.cat(ids).numpy(), torch.cat(probabilities).numpy()


def evaluate(
    learner: Learner, features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> ClassificationMetrics:
    """Accuracy, per-class and calibration metrics of the learner's current prompt."""
    predictions, probabilities = predict(learner, features)
    return classification_metrics(labels.numpy(), predictions, num_classes, probabilities)


class ProximalTerm(torch.nn.Module):
    """FedProx's site objective (Li et al., MLSys 2020): loss + (mu / 2) * ||w - w_global||^2.

    Wraps a learner for ``train_local``: the same parameters, the loss with the proximal term.
    ``anchored`` names the tensors the term holds near their start (None: every trainable one);
    a site's personalized tensors are not the global model and are left free.
    """

    def __init__(
        self, learner: Learner, mu: float, anchored: Collection[str] | None = None
    ) -> None:
        super().__init__()
        self.learner = learner
        self.mu = mu
        self.anchored = None if anchored is None else frozenset(anchored)
        self.anchor = {name: p.detach().clone() for name, p in self._trainable()}
        self.required_inputs = required_inputs(learner)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [
            (n, p)
            for n, p in self.learner.named_parameters()
            if p.requires_grad and (self.anchored is None or n in self.anchored)
        ]

    @property
    def backbone(self) -> Any:
        """The wrapped learner's frozen backbone (a plain attribute, never a submodule)."""
        return self.learner.backbone

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """The learner's loss plus the proximal term."""
        distance = sum(((p - self.anchor[n]) ** 2).sum() for n, p in self._trainable())
        return self.learner.loss(image_features, labels, **extras) + 0.5 * self.mu * distance
