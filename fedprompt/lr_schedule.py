"""The learning rate of every epoch of a run, in closed form, so that rounds and resumes agree.

The papers train with Dassl's schedule (``dassl/optim/lr_scheduler.py``): the rate is updated
once per epoch (after an epoch's last batch), held at ``warmup_lr`` for the warm-up epochs, then
follows ``CosineAnnealingLR(T_max=MAX_EPOCH)`` whose count restarts after the warm-up
(``WARMUP_RECOUNT``). Epoch ``w + t`` of a run with ``w`` warm-up epochs and ``E`` epochs in all
therefore gets ``lr * (1 + cos(pi * t / E)) / 2``. A federated run numbers its epochs across
rounds, so the rate depends only on the round and the local epoch, never on optimizer state that
a new round or a resume would lose.

``train.lr_step=batch`` advances the same formula after every batch instead, counting ``w`` and
``E`` in batches, as the CLIP-Adapter trainer in BiomedCoOp's benchmark does: it builds
``CosineAnnealingLR(T_max=train_epoch)`` and a one-step warm-up but steps them per batch, so its
rate falls to 0 within 20 batches and then rises again (period ``2E`` batches; torch's
recursive form equals the closed form beyond ``T_max``). Step ``k`` of the run is epoch ``e``'s
batch ``b``: ``k = e * B + b`` with ``B`` the site's batches per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SCHEDULES: tuple[str, ...] = ("constant", "cosine")
"""Values of ``train.lr_schedule``."""

STEP_UNITS: tuple[str, ...] = ("epoch", "batch")
"""Values of ``train.lr_step``: how often the schedule advances."""


@dataclass(frozen=True)
class LRSchedule:
    """The rate of each epoch of a whole run.

    Attributes:
        lr: ``train.lr``, the rate after the warm-up (the cosine's start).
        kind: ``constant`` or ``cosine``.
        warmup_epochs: Leading epochs of the run held at ``warmup_lr``.
        warmup_lr: The warm-up rate (Dassl's ``WARMUP_CONS_LR``).
        total_epochs: Planned epochs of the run: rounds x local epochs (the cosine's period).
        unit: ``epoch`` (Dassl) or ``batch``: what ``warmup_epochs``, ``total_epochs`` and the
            argument of ``rate`` count.
    """

    lr: float
    kind: str = "constant"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    total_epochs: int = 1
    unit: str = "epoch"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, not {self.kind!r}."
            )
        if self.unit not in STEP_UNITS:
            raise ValueError(
                f"train.lr_step must be one of {', '.join(STEP_UNITS)}, not {self.unit!r}."
            )

    @classmethod
    def from_config(cls, train_cfg: Mapping[str, Any], num_rounds: int) -> LRSchedule:
        """The schedule a ``train`` section plans over ``num_rounds`` rounds.

        Configs without the schedule keys keep a constant ``train.lr``, as before they existed.
        """
        return cls(
            lr=float(train_cfg["lr"]),
            kind=str(train_cfg.get("lr_schedule", "constant")),
            warmup_epochs=int(train_cfg.get("warmup_epochs", 0)),
            warmup_lr=float(train_cfg.get("warmup_lr", 1e-5)),
            total_epochs=max(1, num_rounds * int(train_cfg["local_epochs"])),
            unit=str(train_cfg.get("lr_step", "epoch")),
        )

    def rate(self, run_epoch: int) -> float:
        """The rate of step ``run_epoch`` of the run (0-based, counted across rounds).

        A step is an epoch, or a batch under ``unit="batch"``.
        """
        if run_epoch < self.warmup_epochs:
            return self.warmup_lr
        if self.kind == "constant":
            return self.lr
        elapsed = run_epoch - self.warmup_epochs
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * elapsed / self.total_epochs))


    def rate_of_batch(self, run_epoch: int, batch: int, batches_per_epoch: int) -> float:
        """The rate of batch ``batch`` (0-based) of the run's epoch ``run_epoch``."""
        if self.unit == "epoch":
            return self.rate(run_epoch)
        return self.rate(run_epoch * batches_per_epoch + batch)


def run_epoch(server_round: int, local_epoch: int, local_epochs: int) -> int:
    """The run's epoch (0-based) of ``local_epoch`` (0-based) in ``server_round`` (1-based)."""
    return (server_round - 1) * local_epochs + local_epoch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
