"""Checkpoint and resume: the global prompt, the strategy's state, the round, the random state.

Written at the end of every round into the results folder (``checkpoint.pt``), so a server that
stops (a crash, a restart, a power cut) continues from its last completed round with
``resume=<results folder>``, and the continued run is the one that would have run uninterrupted.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt
from omegaconf import DictConfig, OmegaConf

from fedprompt.config import ConfigError
from fedprompt.results import ResultsFolder

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

# Keys a resumed run may change: where it writes, how far it goes, how long it waits.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "output_dir",
        "federation.rounds",
        "federation.round_timeout",
        "federation.connect_timeout",
    }
)

# The state a strategy carries from round to round, by the Flower class that defines it.
STRATEGY_STATE: tuple[tuple[type[Strategy], tuple[str, ...]], ...] = ((FedOpt, ("m_t", "v_t")),)


@dataclass(frozen=True)
class Checkpoint:
    """A run as it stood at the end of ``round``."""

    round: int
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, dict[str, torch.Tensor]]
    random_state: dict[str, Any]
    initial: dict[str, Any] | None


def innermost(strategy: Strategy) -> Strategy:
    """The strategy inside the wrappers (validation, round offset): the one that aggregates."""
    while hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """The aggregating strategy's own state between rounds (FedAdam's moments, for instance)."""
    inner = innermost(strategy)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for kind, names in STRATEGY_STATE:
        if isinstance(inner, kind):
            for name in names:
                value = getattr(inner, name)
                if value is not None:
                    state[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return state


def load_strategy_state(
    strategy: Strategy, state: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    """Give the aggregating strategy back the state ``strategy_state`` took."""
    inner = innermost(strategy)
    for name, arrays in state.items():
        if not hasattr(inner, name):
            raise ConfigError(
                f"The checkpoint holds {name} for another strategy than {type(inner).__name__}; "
                "resume with the strategy the run started with."
            )
        setattr(inner, name, {key: value.numpy() for key, value in arrays.items()})


def random_state() -> dict[str, Any]:
    """Python's, numpy's and torch's global random state (Flower samples sites with ``random``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def restore_random_state(state: Mapping[str, Any]) -> None:
    """Undo everything drawn since ``random_state()`` was taken."""
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))  # numpy takes the key as a list of ints
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    results: ResultsFolder,
    server_round: int,
    arrays: ArrayRecord,
    strategy: Strategy,
    initial: dict[str, Any] | None,
) -> None:
    """Write the end of ``server_round`` atomically over the previous checkpoint."""
    results.save_torch(
        CHECKPOINT_NAME,
        {
            "format": CHECKPOINT_FORMAT,
            "round": server_round,
            "global_state": arrays.to_torch_state_dict(),
            "strategy_state": strategy_state(strategy),
            "random_state": random_state(),
            "initial": initial,
        },
    )


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """The checkpoint of a results folder.

    Raises:
        ConfigError: The folder holds no checkpoint (no round completed, or not a results folder).
    """
    path = Path(folder).expanduser().resolve() / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(
            f"Cannot resume from {path.parent}: it holds no {CHECKPOINT_NAME}, so no round of a "
            "run completed there; start a new run instead (drop resume=)."
        )
    data = torch.load(path, weights_only=True)
    if data.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{path} was written by another fedprompt version (format {data.get('format')}); "
            "resume it with that version or start a new run."
        )
    return Checkpoint(
        round=int(data["round"]),
        global_state=dict(data["global_state"]),
        strategy_state=dict(data["strategy_state"]),
        random_state=data["random_state"],
        initial=data["initial"],
    )


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resumable(saved: DictConfig, cfg: DictConfig) -> None:
    """Stop unless ``cfg`` is the saved run's config up to the keys a resumed run may change.

    Raises:
        ConfigError: Naming the first keys that differ, with both values.
    """
    before = _flat(OmegaConf.to_container(saved, resolve=True))
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(
        key
        for key in before.keys() | now.keys()
        if key not in RESUMABLE_CHANGES and before.get(key) != now.get(key)
    )
    if changed:
        shown = ", ".join(f"{k} was {before.get(k)!r}, now {now.get(k)!r}" for k in changed[:3])
        raise ConfigError(
            f"A resumed run must keep the settings it started with ({shown}); give the same "
            "experiment and overrides as the first time, changing only federation.rounds."
        )


def resumable_checkpoint(folder: Path, cfg: DictConfig) -> Checkpoint:
    """The checkpoint to continue ``folder``'s run from with ``cfg``, once everything is checked.

    Raises:
        ConfigError: Not a results folder, no completed round, or other settings than the run's.
    """
    saved = folder / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"Cannot resume from {folder}: it holds no config.yaml, so it is not a fedprompt "
            "results folder; give the folder the run wrote."
        )
    checkpoint = load_checkpoint(folder)
    check_resumable(OmegaConf.load(saved), cfg)
    return checkpoint


class RoundOffset(Strategy):
    """Numbers a resumed run's rounds from where it stopped.

    Flower's ``start()`` counts rounds from 1; the wrapped strategy (and through its config, each
    site's training seed and FedAdam's bias correction) sees the run's true round instead.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy = strategy
        self.offset = offset

    def summary(self) -> None:
        """Delegated."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated with the run's round number."""
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegated with the run's round number."""
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated with the run's round number."""
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated with the run's round number."""
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)
