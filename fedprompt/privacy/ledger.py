"""A site's privacy budget: one Opacus accountant that persists across every round of a run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant, create_accountant
from opacus.optimizers import DPOptimizer

from fedprompt.privacy.calibration import (
    check_accountant,
    default_delta,
    noise_multiplier_for,
    planned_steps,
    sample_rate,
    steps_per_epoch,
)

LedgerValue = float | int | str | list[float] | list[int]
"""What ``SiteLedger.to_dict`` holds: scalars and flat lists, as a Flower ``ConfigRecord`` takes."""

_PLAN_KEYS = ("target_epsilon", "delta", "accountant", "sample_rate", "num_records")


@dataclass
class SiteLedger:
    """The (epsilon, delta) budget of one site and every noisy step spent against it.

    A fresh accountant each round would report the epsilon of one round only; this ledger is
    created once per run (``plan``), kept in the node's state and on disk between rounds
    (``to_dict``/``from_dict``, ``save``/``load``), and its Opacus accountant records every noisy
    step (``optimizer_hook``), so ``epsilon()`` covers the whole run.

    Attributes:
        target_epsilon: The site's budget for the whole run.
        delta: The delta every epsilon is reported at.
        noise_multiplier: Gaussian noise std over the clipping norm, fixed for the run.
        sample_rate: Poisson sampling rate q = batch_size / num_records.
        num_records: Training records (images) at the site; the sampling rate assumes them.
        accountant: Opacus accountant name (``rdp`` or ``prv``).
        planned_steps: Noisy steps the noise multiplier was calibrated for.
    """

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    num_records: int
    accountant: str
    planned_steps: int
    _meter: IAccountant = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        if not self.target_epsilon > 0:
            raise ValueError(f"privacy.epsilon must be positive, got {self.target_epsilon}.")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}.")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"The sample rate must be in (0, 1], got {self.sample_rate}.")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"The noise multiplier must be positive, got {self.noise_multiplier}.")
        self._meter = create_accountant(mechanism=self.accountant)

    @classmethod
    def plan(
        cls,
        *,
        target_epsilon: float,
        num_records: int,
        batch_size: int,
        rounds: int,
        local_epochs: int,
        delta: float | None = None,
        accountant: str = "prv",
        noise_multiplier: float | None = None,
    ) -> SiteLedger:
        """A new ledger whose noise multiplier spends ``target_epsilon`` over the planned run.

        Args:
            target_epsilon: Budget for the whole run.
            num_records: The site's training records.
            batch_size: Expected batch size; the sampling rate is ``batch_size / num_records``.
            rounds: Planned federated rounds.
            local_epochs: Local epochs per round.
            delta: Target delta; ``None`` means ``1 / (10 * num_records)``.
            accountant: ``rdp`` or ``prv``.
            noise_multiplier: A fixed noise multiplier instead of the calibrated one; the budget
                still caps the run (a site stops once its next round would exceed it).
        """
        rate = sample_rate(batch_size, num_records)
        steps = planned_steps(rounds, local_epochs, rate)
        delta = default_delta(num_records) if delta is None else float(delta)
        if noise_multiplier is None:
            noise_multiplier = noise_multiplier_for(target_epsilon, delta, rate, steps, accountant)
        return cls(
            target_epsilon=float(target_epsilon),
            delta=delta,
            noise_multiplier=float(noise_multiplier),
            sample_rate=rate,
            num_records=int(num_records),
            accountant=accountant,
            planned_steps=steps,
        )

    @classmethod
    def from_config(
        cls,
        privacy_cfg: Mapping[str, Any],
        train_cfg: Mapping[str, Any],
        rounds: int,
        num_records: int,
    ) -> SiteLedger:
        """``plan`` from the run's ``privacy`` and ``train`` sections and its round count.

        Reads ``privacy.epsilon``, ``privacy.delta`` (null: the default), ``privacy.accountant``
        and ``privacy.noise_multiplier`` (null: calibrated), and ``train.batch_size`` and
        ``train.local_epochs``.
        """
        delta = privacy_cfg.get("delta")
        noise = privacy_cfg.get("noise_multiplier")
        return cls.plan(
            target_epsilon=float(privacy_cfg["epsilon"]),
            num_records=num_records,
            batch_size=int(train_cfg["batch_size"]),
            rounds=rounds,
            local_epochs=int(train_cfg["local_epochs"]),
            delta=None if delta is None else float(delta),
            accountant=str(privacy_cfg.get("accountant", "prv")),
            noise_multiplier=None if noise is None else float(noise),
        )

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise multiplier, sample rate, steps) runs as Opacus' accountant composes them."""
        return [(float(s), float(q), int(n)) for s, q, n in self._meter.history]

    @property
    def steps(self) -> int:
        """Noisy steps spent so far in the run."""
        return sum(n for _, _, n in self.history)

    def steps_per_round(self, local_epochs: int) -> int:
        """Noisy steps one round of ``local_epochs`` epochs takes at this sampling rate."""
        return int(local_epochs) * steps_per_epoch(self.sample_rate)

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon at ``delta`` after the steps spent so far plus ``extra_steps`` more."""
        history = self.history
        if extra_steps:
            # Merged as the accountant merges steps, so this equals epsilon() once they are spent.
            last = (self.noise_multiplier, self.sample_rate)
            if history and history[-1][:2] == last:
                history[-1] = (*last, history[-1][2] + int(extra_steps))
            else:
                history.append((*last, int(extra_steps)))
        if not history:
            return 0.0
        meter = create_accountant(mechanism=self.accountant)
        meter.history = history
        return float(meter.get_epsilon(delta=self.delta))

    def can_afford(self, steps: int) -> bool:
        """Whether ``steps`` more noisy steps keep the run within ``target_epsilon``."""
        return self.epsilon(extra_steps=steps) <= self.target_epsilon

    def spend(self, steps: int) -> None:
        """Records ``steps`` noisy steps taken at the ledger's noise multiplier and rate."""
        if steps < 0:
            raise ValueError(f"Cannot spend a negative number of steps ({steps}).")
        for _ in range(steps):
            self._meter.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def optimizer_hook(self) -> Callable[[DPOptimizer], None]:
        """Opacus' accountant hook for a ``DPOptimizer``: one recorded step per noisy step.

        Raises (when called):
            ValueError: The optimizer's noise multiplier is not the ledger's.
        """
        opacus_hook = self._meter.get_optimizer_hook_fn(sample_rate=self.sample_rate)

        def hook(optimizer: DPOptimizer) -> None:
            if optimizer.noise_multiplier != self.noise_multiplier:
                raise ValueError(
                    f"The optimizer adds noise {optimizer.noise_multiplier}, the ledger planned "
                    f"{self.noise_multiplier}."
                )
            opacus_hook(optimizer)

        return hook

    def summary(self) -> dict[str, float | int | str]:
        """The site's entry under ``summary.json``'s ``"privacy"``."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant,
        }

    def to_dict(self) -> dict[str, LedgerValue]:
        """Scalars and flat lists only, so it fits a Flower ``ConfigRecord`` and JSON alike."""
        history = self.history
        return {
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "num_records": self.num_records,
            "accountant": self.accountant,
            "planned_steps": self.planned_steps,
            "history_noise_multipliers": [s for s, _, _ in history],
            "history_sample_rates": [q for _, q, _ in history],
            "history_steps": [n for _, _, n in history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteLedger:
        """The ledger ``to_dict`` described, with its spent steps.

        Raises:
            ValueError: A key is missing or the history lists differ in length.
        """
        missing = sorted({*_PLAN_KEYS, "noise_multiplier", "planned_steps"} - set(data))
        if missing:
            raise ValueError(f"The saved privacy ledger lacks {missing}.")
        ledger = cls(
            target_epsilon=float(data["target_epsilon"]),
            delta=float(data["delta"]),
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]),
            num_records=int(data["num_records"]),
            accountant=str(data["accountant"]),
            planned_steps=int(data["planned_steps"]),
        )
        sigmas = list(data.get("history_noise_multipliers", []))
        rates = list(data.get("history_sample_rates", []))
        counts = list(data.get("history_steps", []))
        if not len(sigmas) == len(rates) == len(counts):
            raise ValueError("The saved privacy ledger's history lists differ in length.")
        ledger._meter.history = [
            (float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, counts, strict=True)
        ]
        return ledger

    def save(self, path: str | os.PathLike) -> None:
        """Writes the ledger as JSON through a temporary file, so a crash leaves the old one."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SiteLedger:
        """The ledger ``save`` wrote."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def check_same_budget(self, budget: Mapping[str, Any]) -> None:
        """Checks that this saved ledger was planned for ``budget`` (see ``planned_budget``).

        The noise multiplier and planned steps may differ (a resumed run with more rounds keeps
        the saved noise and stops a site at its budget); the budget itself may not.

        Raises:
            ValueError: The target epsilon, delta, accountant, sample rate or record count differ.
        """
        saved = self.to_dict()
        changed = [key for key in _PLAN_KEYS if saved[key] != budget[key]]
        if changed:
            details = ", ".join(f"{key} {saved[key]} -> {budget[key]}" for key in changed)
            raise ValueError(
                f"This site's privacy budget changed during the run ({details}); a ledger "
                "cannot be restarted mid-run. Start a new run (new output_dir) instead."
            )


def planned_budget(
    privacy_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], num_records: int
) -> dict[str, float | int | str]:
    """The budget a config sets for a site, without calibrating noise: ``_PLAN_KEYS``' values."""
    delta = privacy_cfg.get("delta")
    return {
        "target_epsilon": float(privacy_cfg["epsilon"]),
        "delta": default_delta(num_records) if delta is None else float(delta),
        "accountant": check_accountant(str(privacy_cfg.get("accountant", "prv"))),
        "sample_rate": sample_rate(int(train_cfg["batch_size"]), num_records),
        "num_records": int(num_records),
    }


def load_or_plan_ledger(
    privacy_cfg: Mapping[str, Any],
    train_cfg: Mapping[str, Any],
    rounds: int,
    num_records: int,
    *,
    state: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
) -> SiteLedger:
    """The site's ledger: the saved one (node state or file) if any, else a freshly planned one.

    Where both the node state and the file hold a ledger, the one with more spent steps wins,
    so that a lost save can only over-count the budget, never under-count it.

    Args:
        privacy_cfg: The run's ``privacy`` section.
        train_cfg: The run's ``train`` section.
        rounds: The run's planned rounds.
        num_records: The site's training records.
        state: ``SiteLedger.to_dict()`` as kept in the node's state, or ``None``.
        path: The ledger file beside the site's checkpoint, or ``None``.

    Raises:
        ValueError: A saved ledger was planned for another budget (see ``check_same_budget``).
    """
    saved = []
    if state:
        saved.append(SiteLedger.from_dict(state))
    if path is not None and Path(path).exists():
        saved.append(SiteLedger.load(path))
    if not saved:
        return SiteLedger.from_config(privacy_cfg, train_cfg, rounds, num_records)
    ledger = max(saved, key=lambda candidate: candidate.steps)
    ledger.check_same_budget(planned_budget(privacy_cfg, train_cfg, num_records))
    return ledger
