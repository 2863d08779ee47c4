"""Training recipes: the authors' released values for a method, dataset and protocol, as data.

``recipe=paper`` cannot be a plain Hydra group, because its values depend on three other
groups' choices. So its file names the recipe, and the values sit in a table per method,
``configs/recipe/<recipe>/<method>.yaml``, with sections that apply in order: ``all``, then
``<protocol>.all``, then ``<protocol>.<dataset>``; each key is a config key (``train.lr``),
except ``epochs``, the paper's epoch count, which becomes ``federation.rounds`` rounds of
``train.local_epochs`` epochs. ``apply_recipe`` lays the table over a composed config once;
a key the user set on the command line wins over it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedprompt.config import CONFIG_DIR, ConfigError

EPOCHS = "epochs"
"""The table key for the paper's number of epochs; it sets rounds and local epochs."""


def recipe_table(recipe: str, method: str) -> dict[str, Any] | None:
    """The table ``configs/recipe/<recipe>/<method>.yaml``, or None where a recipe has none."""
    path = CONFIG_DIR / "recipe" / recipe / f"{method}.yaml"
    if not path.is_file():
        return None
    table = OmegaConf.to_container(OmegaConf.load(path))
    return dict(table) if isinstance(table, dict) else {}


def recipe_values(recipe: str, method: str, protocol: str, dataset: str) -> dict[str, Any]:
    """The values a recipe gives a method on a dataset under a protocol, as flat config keys.

    Raises:
        ConfigError: The recipe has tables, but none for this method.
    """
    folder = CONFIG_DIR / "recipe" / recipe
    table = recipe_table(recipe, method)
    if table is None:
        if not folder.is_dir():
            return {}
        offered = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(
            f"recipe={recipe} has no values for method={method}; it covers {offered}. "
            "Choose one of those or recipe=federated."
        )
    section = table.get(protocol) or {}
    values: dict[str, Any] = {}
    for part in (table.get("all"), section.get("all"), section.get(dataset)):
        values.update(part or {})
    return values


def _user_keys(overrides: Iterable[str]) -> list[str]:
    """The config keys a list of Hydra overrides sets (``+train.lr=1`` gives ``train.lr``).

    A group choice (``method=ogkd``) picks a file and sets no value, so it is left out.
    """
    names = [text.partition("=")[0].lstrip("+~") for text in overrides if "=" in text]
    return [name for name in names if not (CONFIG_DIR / name).is_dir()]


def _overridden(key: str, user_keys: list[str]) -> bool:
    """Whether the user set ``key``, a section holding it, or a key inside it."""
    return any(
        key == user or key.startswith(user + ".") or user.startswith(key + ".")
        for user in user_keys
    )


def _epoch_values(epochs: int, cfg: DictConfig, user_keys: list[str]) -> dict[str, int]:
    """Rounds and local epochs that make up the paper's ``epochs``.

    One epoch a round, so that each round is one of the paper's epochs; where the user chose the
    local epochs, as many rounds as cover ``epochs``; a user's rounds win as any key does.
    """
    if _overridden("train.local_epochs", user_keys):
        local_epochs = int(cfg.train.local_epochs)
        return {"federation.rounds": max(1, math.ceil(epochs / local_epochs))}
    return {"federation.rounds": epochs, "train.local_epochs": 1}


def apply_recipe(cfg: DictConfig, overrides: Iterable[str]) -> list[str]:
    """Lay the chosen recipe's values over ``cfg`` (in place); return the keys it set.

    ``recipe=federated`` (and a config without a ``recipe`` section) leaves ``cfg`` unchanged.

    Raises:
        ConfigError: The recipe has no table for the method, or a table names a key the
            config does not have (a typo in the table).
    """
    recipe = OmegaConf.select(cfg, "recipe.name", default=None)
    if recipe is None:
        return []
    values = recipe_values(
        str(recipe), str(cfg.method.name), str(cfg.protocol.name), str(cfg.dataset.name)
    )
    user_keys = _user_keys(overrides)
    if EPOCHS in values:
        values |= _epoch_values(int(values.pop(EPOCHS)), cfg, user_keys)
    applied = []
    for key, value in values.items():
        if _overridden(key, user_keys):
            continue
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise ConfigError(
                f"configs/recipe/{recipe}/{cfg.method.name}.yaml sets {key}, which the "
                "config does not have; correct the table."
            )
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"recipe={recipe} cannot set {key}={value}: {err}") from err
        applied.append(key)
    return applied
