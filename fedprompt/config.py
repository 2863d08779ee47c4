"""Compose a run's configuration from the Hydra configs under ``configs/``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_DIR / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be composed; the message says which key and what to do."""


def list_choices(group: str) -> list[str]:
    """Names a config group offers, e.g. ``list_choices("experiment")``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(overrides: Sequence[str]) -> None:
    """A choice of config group that does not exist (``method=copo``) names the ones that do.

    Raises:
        ConfigError: The group, the value and the choices there are.
    """
    for text in overrides:
        name, sep, value = text.partition("=")
        group = name.lstrip("+~")
        if not sep or "." in group or "/" in group or not (CONFIG_DIR / group).is_dir():
            continue
        choices = list_choices(group)
        if value not in choices:
            raise ConfigError(
                f"{group}={value} is not one of fedprompt's {group} configs; choose one of "
                f"{', '.join(choices)}."
            )


def check_group_sections(cfg: DictConfig, choices: dict[str, str | None]) -> None:
    """Each group's section is the file chosen for it, whole.

    Code reads a group's ``name`` to decide what runs (``privacy.name`` turns DP-SGD on), so a
    section removed (``~privacy``) or renamed (``privacy=dpsgd privacy.name=none``) would run
    something other than the config shows; both are refused.

    Raises:
        ConfigError: The group and how to choose it.
    """
    for group in sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()):
        if group == "experiment":
            continue
        chosen = choices.get(group)
        if chosen is None:
            raise ConfigError(
                f"The config has no {group} section; every run needs one, so choose it with "
                f"{group}=NAME (one of {', '.join(list_choices(group))})."
            )
        name = OmegaConf.select(cfg, f"{group}.name")
        if name != chosen:
            shown = "null" if name is None else name
            raise ConfigError(
                f"{group}.name={shown} disagrees with the {group} config loaded ({chosen}); "
                f"choose a {group} with {group}=NAME, not by setting {group}.name."
            )


def compose_config(experiment: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the root config, an optional experiment and Hydra overrides into one resolved config.

    The result is read-only and fully resolved, so every process of a run (the server and each
    site) that composes the same arguments sees exactly the same values.
    """
    return _compose_cached(experiment, tuple(overrides)).copy()


@functools.lru_cache(maxsize=16)
def _compose_cached(experiment: str | None, overrides: tuple[str, ...]) -> DictConfig:
    # Imported here: fedprompt.recipes reads CONFIG_DIR and ConfigError from this module.
    from fedprompt.recipes import apply_recipe

    if not CONFIG_DIR.is_dir():
        raise ConfigError(
            f"The config folder {CONFIG_DIR} is missing; install fedprompt from a source checkout "
            "with `pip install -e .` so that configs/ sits beside the package."
        )
    if experiment and experiment not in list_choices("experiment"):
        raise ConfigError(
            f"Unknown experiment {experiment!r}; "
            f"choose one of {', '.join(list_choices('experiment'))}."
        )
    check_group_choices(overrides)
    all_overrides = ([f"experiment={experiment}"] if experiment else []) + list(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=all_overrides, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        check_group_sections(cfg, choices)
        apply_recipe(cfg, all_overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"Cannot compose the config from {all_overrides}: {first_line} "
            "(check the key names against configs/ and the README's table of keys)."
        ) from err
    OmegaConf.set_readonly(cfg, True)
    return cfg
