import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedprompt.config import compose_config
from fedprompt.federation.run_config import (
    RUN_CONFIG_KEYS,
    config_from_run_config,
    default_run_config,
    overrides_to_run_config,
    run_config_to_overrides,
)

SIMULATIONS = sorted((Path(__file__).parents[1] / "simulations").glob("*/pyproject.toml"))


def _app_config(pyproject: Path) -> dict:
    with pyproject.open("rb") as handle:
        return flatten_dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def test_there_are_simulation_apps():
    assert {p.parent.name for p in SIMULATIONS} >= {"quickstart", "btmri_5sites"}


@pytest.mark.parametrize("pyproject", SIMULATIONS, ids=lambda p: p.parent.name)
def test_every_app_declares_exactly_the_bridge_keys(pyproject):
    declared = _app_config(pyproject)
    assert declared == default_run_config(pyproject.parent.name)
    for key in declared:
        prefix = key + "."
        assert not any(other.startswith(prefix) for other in declared), key


@pytest.mark.parametrize("pyproject", SIMULATIONS, ids=lambda p: p.parent.name)
def test_app_components_point_at_the_shared_apps(pyproject):
    with pyproject.open("rb") as handle:
        data = tomllib.load(handle)
    assert data["project"]["dependencies"] == []
    components = data["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedprompt.federation.server_app:app",
        "clientapp": "fedprompt.federation.client_app:app",
    }


def test_empty_values_mean_the_experiment_defaults():
    experiment, overrides = run_config_to_overrides(default_run_config("quickstart"))
    assert experiment == "quickstart"
    assert overrides == []


def test_groups_are_chosen_by_name_and_leaves_pass_through():
    run_config = default_run_config("quickstart") | {
        "dataset.name": "breastmnist",
        "partition.name": "dirichlet",
        "partition.alpha": 0.1,
        "federation.rounds": 7,
        "evaluation.central": False,
        "overrides": "train.momentum=0.5 'method.ctx_init=a scan of a'",
    }
    _, overrides = run_config_to_overrides(run_config)
    assert overrides == [
        "dataset=breastmnist",
        "partition=dirichlet",
        "federation.rounds=7",
        "partition.alpha=0.1",
        "evaluation.central=false",
        "train.momentum=0.5",
        "method.ctx_init=a scan of a",
    ]


def test_unknown_run_config_key_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="overrides="):
        run_config_to_overrides({"experiment": "quickstart", "dataset": "btmri"})


def test_run_config_composes_the_same_config_as_hydra():
    run_config = default_run_config("quickstart") | {"federation.rounds": 5, "train.lr": 0.5}
    direct = compose_config("quickstart", ["federation.rounds=5", "train.lr=0.5"])
    assert config_from_run_config(run_config) == direct
    assert direct.federation.rounds == 5 and direct.train.lr == 0.5


def test_simulate_sends_overrides_through_one_key():
    run_config = overrides_to_run_config("quickstart", ["train.lr=0.5", "method.ctx_init=a b"])
    assert set(run_config) <= set(RUN_CONFIG_KEYS)
    assert run_config_to_overrides(run_config) == (
        "quickstart",
        ["train.lr=0.5", "method.ctx_init=a b"],
    )
