"""End to end through the real Flower simulation engine (a SuperLink, flwr run, Ray actors)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedprompt.config import compose_config
from fedprompt.federation.local_simulation import (
    flwr_run_command,
    private_superlink,
    write_run_config,
)

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _check_results(folder: Path, rounds: int, num_sites: int) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "partitions.json"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, rounds + 1))
    assert summary["rounds"] == rounds and summary["num_sites"] == num_sites
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= summary["final"][key] <= 1.0
    assert summary["privacy"] is None and summary["wall_seconds"] > 0
    assert set(summary["final"]["per_site"]) == {f"site-{i}" for i in range(num_sites)}

    # Only the trainable tensors travel: each site sends them up once per round (train reply)
    # and receives them twice (train and evaluate instructions).
    payload = summary["communication"]["payload_bytes_per_message"]
    assert payload == 4 * summary["communication"]["trainable_parameters"]  # float32
    assert payload < summary["communication"]["backbone_bytes"] / 100
    for line in lines:
        assert len(line["sites"]) == num_sites
        for site in line["sites"].values():
            assert site["bytes_up"] == payload and site["bytes_down"] == 2 * payload
            assert site["train_loss"] > 0 and site["num_train"] > 0 and site["num_test"] > 0
        assert line["bytes_up"] == num_sites * payload

    partitions = json.loads((folder / "partitions.json").read_text())
    assert partitions and "site-0" in json.dumps(partitions)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["federation"]["rounds"] == rounds
    return summary


def test_flwr_run_quickstart_app(tmp_path):
    out = tmp_path / "results"
    cfg = compose_config("quickstart", ["federation.rounds=2"])
    run_config = write_run_config(
        tmp_path / "run-config.toml", {"federation.rounds": 2, "output_dir": str(out)}
    )
    with private_superlink(tmp_path) as env:
        command = flwr_run_command(ROOT / "simulations/quickstart", run_config, cfg)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 2/2" in done.stdout + done.stderr
    _check_results(out, rounds=2, num_sites=3)


def test_fedprompt_simulate_runs_through_flower(tmp_path):
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "fedprompt.cli",
        "simulate",
        "quickstart",
        "federation.rounds=1",
        "federation.num_sites=2",
        "partition=dirichlet",
        "partition.alpha=1.0",
        f"output_dir={out}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = _check_results(out, rounds=1, num_sites=2)
    assert f"results in {out}" in done.stdout
    partitions = json.loads((out / "partitions.json").read_text())
    assert partitions["scheme"] == "dirichlet"
    assert summary["experiment"] == "quickstart"


def _simulate(cwd: Path, overrides: list[str]) -> str:
    """Run the quickstart through the CLI; returns what it printed."""
    command = [sys.executable, "-m", "fedprompt.cli", "simulate", "quickstart", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _lines_without_time(folder: Path) -> list[dict]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("seconds")
    return lines


def test_resume_through_flower_ends_as_the_uninterrupted_run(tmp_path):
    # PromptFolio: each resumed Flower run starts its SuperNodes afresh, so every site must find
    # its own prompt on its disk for the resumed run to equal the uninterrupted one.
    common = [
        "strategy=fedadam",
        "federation.num_sites=2",
        "train.local_epochs=1",
        "personalization=promptfolio",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _simulate(tmp_path, [*common, "federation.rounds=2", f"output_dir={straight}"])
    quiet = _simulate(tmp_path, [*common, "federation.rounds=1", f"output_dir={resumed}"])
    verbose = _simulate(
        tmp_path,
        ["--verbose", *common, "federation.rounds=2", f"output_dir={resumed}", f"resume={resumed}"],
    )
    # --verbose shows Flower's own lines as well; by default they are only in flower.log, which
    # the resumed session appends to.
    assert "aggregate_train: Received 2 results" not in quiet
    assert "aggregate_train: Received 2 results" in verbose and "[ROUND 1/1]" in verbose
    log = (resumed / "flower.log").read_text(encoding="utf-8")
    assert log.count("aggregate_train: Received 2 results") == 2  # one round in each session
    assert _lines_without_time(resumed) == _lines_without_time(straight)
    ours = torch.load(resumed / "global_state.pt")
    theirs = torch.load(straight / "global_state.pt")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert json.loads((resumed / "summary.json").read_text())["resumed_after_round"] == 1
