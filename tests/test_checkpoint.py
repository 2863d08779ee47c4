"""Checkpoint units: the record a round writes, the refusals of a resume (each one sentence), the
strategy state and random state a resumed run takes back, and the round numbers it continues.

The end-to-end resume (a run stopped and resumed is the uninterrupted run) is in test_resume.py.
"""

import pickle
import random
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg
from omegaconf import OmegaConf

from fedprompt.config import ConfigError
from fedprompt.federation.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    Checkpoint,
    RoundOffset,
    check_resumable,
    innermost,
    load_checkpoint,
    load_strategy_state,
    random_state,
    restore_random_state,
    resumable_checkpoint,
    save_checkpoint,
    strategy_state,
)
from fedprompt.federation.validation import UpdateValidation
from fedprompt.results import ResultsFolder

SHAPE = (2, 3)
PROMPT = ArrayRecord({"ctx": Array(np.arange(6, dtype=np.float32).reshape(SHAPE))})


def _fedadam(first=1.0, second=2.0):
    """A FedAdam that has aggregated: both moments set."""
    strategy = FedAdam()
    strategy.m_t = {"ctx": np.full(SHAPE, first, np.float32)}
    strategy.v_t = {"ctx": np.full(SHAPE, second, np.float32)}
    return strategy


def _wrapped(strategy):
    """``strategy`` inside the wrappers a resumed run puts around it."""
    return RoundOffset(UpdateValidation(strategy, PROMPT), offset=2)


def test_a_checkpoint_records_the_round_prompt_strategy_state_random_state_and_initial(tmp_path):
    initial = {"accuracy": 0.25, "loss": 1.5}
    expected_random = random_state()
    save_checkpoint(ResultsFolder(tmp_path), 3, PROMPT, _wrapped(_fedadam()), initial)
    data = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert set(data) == {
        "format",
        "round",
        "global_state",
        "strategy_state",
        "random_state",
        "initial",
    }
    assert data["format"] == CHECKPOINT_FORMAT == 1 and data["round"] == 3
    assert data["initial"] == initial
    assert list(data["global_state"]) == ["ctx"]
    assert torch.equal(data["global_state"]["ctx"], torch.arange(6.0).reshape(SHAPE))
    assert set(data["strategy_state"]) == {"m_t", "v_t"}
    assert torch.equal(data["strategy_state"]["m_t"]["ctx"], torch.ones(SHAPE))
    assert torch.equal(data["strategy_state"]["v_t"]["ctx"], torch.full(SHAPE, 2.0))
    assert data["random_state"]["python"] == expected_random["python"]

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 3 and checkpoint.initial == initial
    assert checkpoint.global_state.keys() == {"ctx"}
    assert torch.equal(checkpoint.global_state["ctx"], data["global_state"]["ctx"])
    assert checkpoint.strategy_state.keys() == {"m_t", "v_t"}
    assert checkpoint.random_state["python"] == expected_random["python"]


def test_a_checkpoint_path_may_start_with_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    save_checkpoint(ResultsFolder(tmp_path / "run"), 1, PROMPT, FedAvg(), None)
    assert load_checkpoint("~/run").round == 1


def test_no_checkpoint_is_refused_in_a_sentence_naming_the_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError) as err:
        load_checkpoint("run")
    assert str(err.value) == (
        f"Cannot resume from {tmp_path.resolve() / 'run'}: it holds no checkpoint.pt, so no "
        "round of a run completed there; start a new run instead (drop resume=)."
    )


@pytest.mark.parametrize("written", [2, None])
def test_a_checkpoint_of_another_or_no_format_is_refused_in_a_sentence(tmp_path, written):
    save_checkpoint(ResultsFolder(tmp_path), 1, PROMPT, FedAvg(), None)
    data = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    data.pop("format")
    if written is not None:
        data["format"] = written
    ResultsFolder(tmp_path, resume=True).save_torch(CHECKPOINT_NAME, data)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value) == (
        f"{tmp_path.resolve() / CHECKPOINT_NAME} was written by another fedprompt version "
        f"(format {written}); resume it with that version or start a new run."
    )


class Planted:
    """An object a checkpoint must never unpickle: only tensors and plain data are loaded."""


def test_a_checkpoint_holding_other_python_objects_is_not_unpickled(tmp_path, monkeypatch):
    # Even where the environment asks torch to unpickle anything by default.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    save_checkpoint(ResultsFolder(tmp_path), 1, PROMPT, FedAvg(), None)
    data = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    torch.save(data | {"initial": Planted()}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(tmp_path)


def test_the_strategy_state_is_the_innermost_strategys_moments():
    strategy = _wrapped(_fedadam())
    assert isinstance(innermost(strategy), FedAdam)
    state = strategy_state(strategy)
    assert state.keys() == {"m_t", "v_t"}
    assert all(isinstance(state[name]["ctx"], torch.Tensor) for name in state)
    assert torch.equal(state["m_t"]["ctx"], torch.ones(SHAPE))
    assert torch.equal(state["v_t"]["ctx"], torch.full(SHAPE, 2.0))
    # Before its first aggregation FedAdam has no moments; FedAvg has none at all.
    assert strategy_state(_wrapped(FedAdam())) == {}
    assert strategy_state(_wrapped(FedAvg())) == {}


def test_a_strategy_takes_back_the_state_it_gave():
    resumed = _wrapped(FedAdam())
    load_strategy_state(resumed, strategy_state(_fedadam(3.0, 4.0)))
    inner = innermost(resumed)
    assert inner.m_t.keys() == inner.v_t.keys() == {"ctx"}
    assert isinstance(inner.m_t["ctx"], np.ndarray)
    np.testing.assert_array_equal(inner.m_t["ctx"], np.full(SHAPE, 3.0, np.float32))
    np.testing.assert_array_equal(inner.v_t["ctx"], np.full(SHAPE, 4.0, np.float32))


def test_a_strategy_state_for_another_strategy_is_refused_in_a_sentence():
    with pytest.raises(ConfigError) as err:
        load_strategy_state(_wrapped(FedAvg()), {"v_t": {"ctx": torch.zeros(SHAPE)}})
    assert str(err.value) == (
        "The checkpoint holds v_t for another strategy than FedAvg; resume with the strategy "
        "the run started with."
    )


def test_the_random_state_brings_back_a_cached_gaussian():
    # numpy's legacy normal draws two values at a time and keeps the second for the next call.
    np.random.seed(7)
    np.random.standard_normal()
    state = random_state()
    assert state["numpy"][3] == 1  # a value is cached
    after = np.random.standard_normal(3).tolist(), random.random(), torch.rand(2).tolist()
    np.random.seed(8)
    random.seed(8)
    torch.manual_seed(8)
    restore_random_state(state)
    assert (np.random.standard_normal(3).tolist(), random.random(), torch.rand(2).tolist()) == after


def _config(**changes):
    settings = {
        "seed": 0,
        "resume": None,
        "output_dir": "results/a",
        "train": {"lr": 0.1, "local_epochs": 1, "batch_size": 8},
        "federation": {"rounds": 2, "round_timeout": 60, "connect_timeout": 30, "num_sites": 3},
    }
    config = OmegaConf.create(settings)
    for key, value in changes.items():
        OmegaConf.update(config, key.replace("__", "."), value, force_add=True)
    return config


def test_a_resumed_run_may_change_where_it_writes_how_far_it_goes_and_how_long_it_waits():
    changed = _config(
        resume="results/a",
        output_dir="results/b",
        federation__rounds=5,
        federation__round_timeout=600,
        federation__connect_timeout=300,
    )
    check_resumable(_config(), changed)  # no refusal


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"seed": 1}, "seed was 0, now 1"),
        ({"federation__num_sites": 4}, "federation.num_sites was 3, now 4"),
        ({"privacy__mode": "dpsgd"}, "privacy.mode was None, now 'dpsgd'"),
        (
            {"train__lr": 0.5, "train__local_epochs": 2, "train__batch_size": 4, "seed": 3},
            "seed was 0, now 3, train.batch_size was 8, now 4, train.local_epochs was 1, now 2",
        ),
    ],
)
def test_another_setting_is_refused_naming_the_first_three_with_both_values(changes, shown):
    with pytest.raises(ConfigError) as err:
        check_resumable(_config(), _config(**changes))
    assert str(err.value) == (
        f"A resumed run must keep the settings it started with ({shown}); give the same "
        "experiment and overrides as the first time, changing only federation.rounds."
    )


def test_a_removed_setting_is_refused_too():
    saved = _config(privacy__mode="dpsgd")
    with pytest.raises(ConfigError, match=re.escape("privacy.mode was 'dpsgd', now None")):
        check_resumable(saved, _config())


def test_a_folder_without_config_yaml_is_refused_in_a_sentence(tmp_path):
    save_checkpoint(ResultsFolder(tmp_path), 1, PROMPT, FedAvg(), None)
    with pytest.raises(ConfigError) as err:
        resumable_checkpoint(tmp_path, _config())
    assert str(err.value) == (
        f"Cannot resume from {tmp_path}: it holds no config.yaml, so it is not a fedprompt "
        "results folder; give the folder the run wrote."
    )


def test_a_resumable_folder_gives_its_checkpoint_once_the_settings_match(tmp_path):
    OmegaConf.save(_config(), tmp_path / "config.yaml")
    save_checkpoint(ResultsFolder(tmp_path), 2, PROMPT, FedAvg(), None)
    checkpoint = resumable_checkpoint(tmp_path, _config(federation__rounds=4))
    assert isinstance(checkpoint, Checkpoint) and checkpoint.round == 2
    with pytest.raises(ConfigError, match=re.escape("seed was 0, now 1")):
        resumable_checkpoint(tmp_path, _config(seed=1))


class _Recorder:
    """A strategy that records the round numbers it is called with."""

    def __init__(self):
        self.calls = []

    def summary(self):
        self.calls.append(("summary",))

    def configure_train(self, server_round, arrays, config, grid):
        self.calls.append(("configure_train", server_round, arrays, config, grid))
        return ["train instructions"]

    def aggregate_train(self, server_round, replies):
        self.calls.append(("aggregate_train", server_round, replies))
        return "train aggregate"

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.calls.append(("configure_evaluate", server_round, arrays, config, grid))
        return ["evaluate instructions"]

    def aggregate_evaluate(self, server_round, replies):
        self.calls.append(("aggregate_evaluate", server_round, replies))
        return "evaluate aggregate"


def test_a_resumed_runs_rounds_are_numbered_from_where_it_stopped():
    inner = _Recorder()
    strategy = RoundOffset(inner, offset=2)
    config, grid, replies = ConfigRecord(), object(), ["reply"]
    strategy.summary()
    assert strategy.configure_train(1, PROMPT, config, grid) == ["train instructions"]
    assert strategy.aggregate_train(1, replies) == "train aggregate"
    assert strategy.configure_evaluate(2, PROMPT, config, grid) == ["evaluate instructions"]
    assert strategy.aggregate_evaluate(2, replies) == "evaluate aggregate"
    assert inner.calls == [
        ("summary",),
        ("configure_train", 3, PROMPT, config, grid),
        ("aggregate_train", 3, replies),
        ("configure_evaluate", 4, PROMPT, config, grid),
        ("aggregate_evaluate", 4, replies),
    ]


def test_settings_are_compared_by_their_resolved_values_on_either_side():
    # config.yaml is written resolved; the composed config may still hold interpolations.
    resolved = _config(federation__min_sites=3)
    interpolated = _config(federation__min_sites="${federation.num_sites}")
    check_resumable(resolved, interpolated)  # no refusal
    check_resumable(interpolated, resolved)
    with pytest.raises(ConfigError, match=re.escape("federation.min_sites was 3, now 4")):
        check_resumable(interpolated, _config(federation__min_sites=4))
