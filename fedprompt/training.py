"""Local optimisation and evaluation of a learner on frozen image features."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedprompt.evaluation.metrics import ClassificationMetrics, classification_metrics
from fedprompt.learners import Learner


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


def train_local(
    learner: Learner,
    features: torch.Tensor,
    labels: torch.Tensor,
    train_cfg: Mapping[str, Any],
    seed: int,
) -> TrainStats:
    """Run ``train.local_epochs`` epochs of mini-batch training; returns the mean training loss.

    The optimizer is created afresh each round, as a site receives a new global prompt each round.
    """
    start = time.perf_counter()
    if len(labels) == 0:
        raise ValueError("This site has no training images; check the partition and train.shots.")
    optimizer = make_optimizer(learner, train_cfg)
    batch_size = int(train_cfg["batch_size"])
    generator = torch.Generator().manual_seed(seed)
    device = learner.backbone.device
    learner.train()
    total_loss, steps = 0.0, 0
    for _ in range(int(train_cfg["local_epochs"])):
        order = torch.randperm(len(labels), generator=generator)
        for begin in range(0, len(order), batch_size):
            batch = order[begin : begin + batch_size]
            loss = learner.loss(features[batch].to(device), labels[batch].to(device))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"The training loss became {loss.item()} at step {steps}; lower train.lr."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            steps += 1
    learner.eval()
    return TrainStats(
        loss=total_loss / max(steps, 1),
        num_examples=len(labels),
        steps=steps,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def predict(learner: Learner, features: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Predicted class ids for frozen image features, in batches to bound memory."""
    learner.eval()
    device = learner.backbone.device
    predictions = [
        learner(features[begin : begin + batch_size].to(device)).argmax(dim=1).cpu()
        for begin in range(0, len(features), batch_size)
    ]
    return torch.cat(predictions).numpy() if predictions else np.empty(0, dtype=np.int64)


def evaluate(
    learner: Learner, features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> ClassificationMetrics:
    """Accuracy, balanced accuracy and macro-F1 of the learner's current prompt."""
    return classification_metrics(labels.numpy(), predict(learner, features), num_classes)
