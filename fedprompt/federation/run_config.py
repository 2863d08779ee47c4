"""The bridge between Flower's run-config and fedprompt's Hydra config keys.

Flower's run-config holds scalars only, accepts overrides only for keys the app declares, and
cannot hold a key that is both a value and a prefix (``dataset`` and ``dataset.root``). So:

- a config group is chosen through its ``name`` key: ``dataset.name="breastmnist"`` becomes the
  Hydra override ``dataset=breastmnist`` (every group file sets ``name`` to its own file name);
- every other declared key is a Hydra key as it is: ``dataset.root="/data"`` becomes
  ``dataset.root=/data``;
- an empty string means "as the experiment says", so an app can declare every key;
- ``experiment`` picks ``configs/experiment/<name>.yaml``;
- ``overrides`` carries any further Hydra overrides, space separated (shell quoting allowed).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig

from fedprompt.config import compose_config

GROUPS: tuple[str, ...] = (
    "backbone",
    "dataset",
    "method",
    "partition",
    "strategy",
    "privacy",
    "protocol",
    "personalization",
)

LEAF_KEYS: tuple[str, ...] = (
    "seed",
    "device",
    "output_dir",
    "backbone.path",
    "dataset.root",
    "federation.num_sites",
    "federation.rounds",
    "partition.alpha",
    "partition.classes_per_site",
    "partition.acquisition",
    "train.shots",
    "train.local_epochs",
    "train.batch_size",
    "train.lr",
    "evaluation.central",
    "evaluation.membership_inference",
    "privacy.epsilon",
)

PLAN_KEY = "grid-plan"
"""The run-config key of a session of many points (``grid_session``): its plan file's path.

The app ``fedprompt simulate`` and ``fedprompt table`` write declares it (empty for one run);
it names no config key, so the bridge passes over it."""

RUN_CONFIG_KEYS: tuple[str, ...] = (
    "experiment",
    "overrides",
    *(f"{group}.name" for group in GROUPS),
    *LEAF_KEYS,
)


def default_run_config(experiment: str) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table a simulation app declares for an experiment."""
    return {key: (experiment if key == "experiment" else "") for key in RUN_CONFIG_KEYS}


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run_config_to_overrides(run_config: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """Turn a Flower run-config into ``(experiment, hydra_overrides)``.

    Raises:
        ValueError: a key that the bridge does not know, naming the keys it does.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS) - {PLAN_KEY})
    if unknown:
        raise ValueError(
            f"Run-config keys {unknown} are not fedprompt keys; use one of {list(RUN_CONFIG_KEYS)} "
            "or pass any Hydra override through overrides='key=value ...'."
        )
    experiment = str(run_config.get("experiment") or "") or None
    choices = [
        f"{group}={run_config[f'{group}.name']}"
        for group in GROUPS
        if run_config.get(f"{group}.name", "") != ""
    ]
    leaves = [
        f"{key}={_format_value(run_config[key])}"
        for key in LEAF_KEYS
        if run_config.get(key, "") != ""
    ]
    extra = shlex.split(str(run_config.get("overrides") or ""))
    return experiment, choices + leaves + extra


def overrides_to_run_config(experiment: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The run-config values ``fedprompt simulate`` sends for an experiment and Hydra overrides."""
    return {"experiment": experiment, "overrides": shlex.join(overrides)}


def config_from_run_config(run_config: Mapping[str, Any]) -> DictConfig:
    """Compose the Hydra config a Flower run-config stands for (same result in every process)."""
    experiment, overrides = run_config_to_overrides(run_config)
    return compose_config(experiment, overrides)
