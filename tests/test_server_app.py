"""A run that cannot train never looks finished: every site broken ends it as failed, in
``summary.json``, in Flower's own run status, and in ``fedprompt simulate``'s exit status."""

import json
import subprocess
from pathlib import Path

import pytest
from sites_on_disk import write_site

from fedprompt.cli import main
from fedprompt.config import compose_config
from fedprompt.federation import local_simulation
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.local_simulation import (
    flwr_run_command,
    private_superlink,
    write_run_config,
)
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.federation.run_monitor import RunFailed

ROOT = Path(__file__).parents[1]


def _break_every_training_image(folder: Path) -> None:
    for image in (folder / "images/train").rglob("*.png"):
        image.write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def test_a_round_without_any_usable_update_fails_the_run(tmp_path):
    names = ["hospital-a", "hospital-b"]
    configs = [write_site(tmp_path / "sites", name, seed=i) for i, name in enumerate(names)]
    for config in configs:
        _break_every_training_image(config.parent)
    overrides = [
        "federation.mode=deployment",
        "federation.num_sites=2",
        "federation.rounds=3",
        f"output_dir={tmp_path / 'run'}",
    ]
    grid = InProcessGrid(
        [{"site-config": str(config)} for config in configs],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
        names=names,
    )
    with pytest.raises(RunFailed, match="Round 1 aggregated no site's update") as failed:
        run_federation(grid, compose_config("quickstart", overrides))
    assert "hospital-a missing: [hospital-a] CorruptImageError" in str(failed.value)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "failed" and summary["final"] is None
    assert summary["reason"] == str(failed.value) and summary["rounds_completed"] == 1
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the failed round is recorded, and nothing after it ran


def test_fedprompt_simulate_exits_non_zero_on_a_failed_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def failed_run(experiment, overrides, cfg, **output):
        out.mkdir()
        summary = {"status": "failed", "reason": "Round 1 aggregated no site's update (...)."}
        (out / "summary.json").write_text(json.dumps(summary))
        return 0  # flwr run --stream exits 0 whatever became of the run

    monkeypatch.setattr(local_simulation, "simulate", failed_run)
    assert main(["simulate", "quickstart", f"output_dir={out}"]) == 1
    assert "the run failed: Round 1 aggregated no site's update" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.e2e
def test_flower_records_a_failed_run_as_failed(tmp_path):
    site = write_site(tmp_path, "data", train=3, test=2).parent
    _break_every_training_image(site)
    out = tmp_path / "results"
    cfg = compose_config("quickstart", ["federation.rounds=2"])
    run_config = write_run_config(
        tmp_path / "run-config.toml",
        {
            "dataset.name": "image_folder",
            "dataset.root": str(site / "images"),
            "federation.rounds": 2,
            "output_dir": str(out),
        },
    )
    with private_superlink(tmp_path) as env:
        command = flwr_run_command(ROOT / "simulations/quickstart", run_config, cfg)
        subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        listed = subprocess.run(
            [local_simulation._tool("flwr"), "ls", "fedprompt", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    runs = json.loads(listed.stdout)["runs"]
    assert [run["status"] for run in runs] == ["finished:failed"], listed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "CorruptImageError" in summary["reason"]
