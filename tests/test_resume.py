"""Checkpoint and resume: a run stopped after round 2 of 4 and resumed is the uninterrupted run."""

import json
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedprompt.config import ConfigError, compose_config
from fedprompt.federation.checkpoint import (
    CHECKPOINT_NAME,
    RoundOffset,
    load_checkpoint,
    load_strategy_state,
    restore_random_state,
    save_checkpoint,
)
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.results import ResultsFolder

SETTINGS = ["train.local_epochs=1", "strategy=fedadam"]


class ServerStopped(Exception):
    """The server process died (a crash, a restart, a power cut)."""


class StoppingGrid(InProcessGrid):
    """Three simulated sites; the server stops when it sends round ``stop_at``'s instructions."""

    def __init__(self, overrides, stop_at=None):
        run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}
        super().__init__([{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
        self.stop_at = stop_at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if self.stop_at and messages[0].content["config"]["server-round"] == self.stop_at:
            raise ServerStopped
        return super().send_and_receive(messages, timeout=timeout)


def _run(folder, rounds, resume=False, stop_at=None, extra=()):
    overrides = [*SETTINGS, f"federation.rounds={rounds}", f"output_dir={folder}", *extra]
    if resume:
        overrides.append(f"resume={folder}")
    return run_federation(StoppingGrid(overrides, stop_at), compose_config("quickstart", overrides))


def _lines(folder):
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("seconds")  # wall time, the one thing that may differ
    return lines


def test_a_stopped_and_resumed_run_is_the_uninterrupted_run(tmp_path):
    _run(tmp_path / "straight", rounds=4)
    stopped = tmp_path / "stopped"
    with pytest.raises(ServerStopped):
        _run(stopped, rounds=4, stop_at=3)
    assert load_checkpoint(stopped).round == 2
    stopped_summary = json.loads((stopped / "summary.json").read_text())
    assert stopped_summary["status"] == "failed" and stopped_summary["final"] is None
    assert stopped_summary["rounds_completed"] == 2
    checkpoint = torch.load(stopped / CHECKPOINT_NAME, weights_only=True)
    assert set(checkpoint["strategy_state"]) == {"m_t", "v_t"}  # FedAdam's moments

    summary = _run(stopped, rounds=4, resume=True)

    assert summary["resumed_after_round"] == 2 and summary["rounds"] == 4
    assert [line["round"] for line in _lines(stopped)] == [1, 2, 3, 4]
    assert _lines(stopped) == _lines(tmp_path / "straight")
    ours = torch.load(stopped / "global_state.pt")
    theirs = torch.load(tmp_path / "straight/global_state.pt")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    straight = json.loads((tmp_path / "straight/summary.json").read_text())
    assert summary["final"] == straight["final"] and summary["initial"] == straight["initial"]
    # Each site's local log lists the updates it sent.
    releases = json.loads((stopped / "sites/site-0/releases.json").read_text())
    assert [entry["round"] for entry in releases["releases"]] == [1, 2, 3, 4]


def test_a_finished_run_goes_on_when_rounds_are_raised(tmp_path):
    _run(tmp_path, rounds=1)
    summary = _run(tmp_path, rounds=2, resume=True)
    assert summary["rounds"] == 2 and summary["resumed_after_round"] == 1
    assert [line["round"] for line in _lines(tmp_path)] == [1, 2]
    config = compose_config("quickstart", [f"resume={tmp_path}"])
    assert config.resume == str(tmp_path)


def test_lines_written_after_the_last_checkpoint_are_replaced(tmp_path):
    _run(tmp_path, rounds=1)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"round": 2, "half": "written"}) + "\n")
    _run(tmp_path, rounds=2, resume=True)
    lines = _lines(tmp_path)
    assert [line["round"] for line in lines] == [1, 2] and "half" not in lines[1]


def test_a_resumed_run_must_keep_its_settings(tmp_path):
    _run(tmp_path, rounds=1)
    with pytest.raises(ConfigError, match=r"train\.lr was 0\.1, now 0\.5"):
        _run(tmp_path, rounds=2, resume=True, extra=["train.lr=0.5"])


def test_nothing_to_resume_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="not a fedprompt results folder"):
        _run(tmp_path / "nowhere", rounds=2, resume=True)
    with pytest.raises(ServerStopped):
        _run(tmp_path, rounds=2, stop_at=1)
    with pytest.raises(ConfigError, match="no round of a run completed there"):
        _run(tmp_path, rounds=2, resume=True)


def test_a_refused_resume_leaves_the_finished_run_as_it_was(tmp_path):
    _run(tmp_path, rounds=1)
    summary = (tmp_path / "summary.json").read_text()
    with pytest.raises(ConfigError):
        _run(tmp_path, rounds=2, resume=True, extra=["seed=5"])
    assert (tmp_path / "summary.json").read_text() == summary


def test_a_resumed_personalized_run_continues_each_site_from_its_own_part(tmp_path):
    personal = ["personalization=fedpgp", "personalization.rank=2"]
    _run(tmp_path / "straight", rounds=3, extra=personal)
    stopped = tmp_path / "stopped"
    with pytest.raises(ServerStopped):
        _run(stopped, rounds=3, stop_at=3, extra=personal)
    # The new grid's nodes start with empty node state: their parts come from their disks.
    summary = _run(stopped, rounds=3, resume=True, extra=personal)
    assert _lines(stopped) == _lines(tmp_path / "straight")
    assert all(line["personalized_accuracy"] is not None for line in _lines(stopped))
    straight = json.loads((tmp_path / "straight/summary.json").read_text())
    assert summary["final"] == straight["final"]
    assert summary["personalization"]["name"] == "fedpgp"


def _draws():
    """What a resumed server draws next: Flower's site sample, and numpy's and torch's values."""
    return random.sample(range(1000), 5), np.random.rand(3).tolist(), torch.rand(3).tolist()


def _checkpoint(folder):
    arrays = ArrayRecord({"ctx": Array(np.zeros((2, 3), np.float32))})
    save_checkpoint(ResultsFolder(folder), 2, arrays, FedAvg(), None)


def test_the_checkpoints_random_state_repeats_the_draws_that_followed_it(tmp_path):
    _checkpoint(tmp_path)
    after_the_checkpoint = _draws()
    _draws()  # the stopped server went on drawing before it died
    restore_random_state(load_checkpoint(tmp_path).random_state)
    assert _draws() == after_the_checkpoint


def test_a_checkpoint_of_another_format_is_refused_in_a_sentence(tmp_path):
    _checkpoint(tmp_path)
    data = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    ResultsFolder(tmp_path, resume=True).save_torch(CHECKPOINT_NAME, data | {"format": 2})
    with pytest.raises(ConfigError, match=r"written by another fedprompt version \(format 2\)"):
        load_checkpoint(tmp_path)


def test_a_strategy_state_for_another_strategy_is_refused(tmp_path):
    fedavg = RoundOffset(FedAvg(), offset=2)
    state = {"m_t": {"ctx": torch.zeros(2, 3)}}  # FedAdam's first moment
    with pytest.raises(ConfigError, match="holds m_t for another strategy than FedAvg"):
        load_strategy_state(fedavg, state)
    assert not hasattr(fedavg.strategy, "m_t")
