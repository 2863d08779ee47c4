"""Grid runner: Hydra sweep expansion, resume, failures that do not stop a grid, mean and std."""

import json
import subprocess
import sys

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from fedprompt.config import ConfigError, check_group_choices
from fedprompt.experiments.grid import (
    GridError,
    Point,
    PointFailed,
    _logged_error,
    _process_output_to,
    expand_sweep,
    mean_and_std,
    open_study,
    parse_sweep,
    run_grid,
    value_of,
)


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy.epsilon=inf,8,4,2,1", "seed=1,2", "partition=iid,dirichlet", "method=coop"],
        ["seed=range(1,4)", "method=choice(coop,kgcoop)", "federation.rounds=2"],
        ["seed=1,2", "train.lr=0.1", "seed=3"],  # a later override replaces an earlier one
        ["+extra=a,b", "dataset.root=/data/x"],
    ],
)
def test_expansion_is_hydra_basic_sweepers(overrides):
    parsed = OverridesParser.create().parse_overrides(overrides)
    (hydra_points,) = BasicSweeper.split_arguments(parsed, None)
    assert expand_sweep(parse_sweep(overrides)) == hydra_points


def test_expansion_order_and_values():
    points = expand_sweep(parse_sweep(["a=1,2", "b=x,y,z"]))
    assert len(points) == 6
    assert points[:2] == [["a=1", "b=x"], ["a=1", "b=y"]]
    assert value_of(points[-1], "b") == "z" and value_of(["+c=3"], "c") == "3"
    assert value_of(points[0], "missing") is None


@pytest.mark.parametrize("override", ["seed=1,,2", "noequals", "train.lr=interval(0,1)"])
def test_unusable_sweep_is_one_sentence(override):
    with pytest.raises(GridError) as err:
        parse_sweep([override])
    message = str(err.value)
    assert override in message and "Hydra's grammar" in message and "\n" not in message


def test_unknown_group_choice_names_the_choices():
    with pytest.raises(ConfigError, match=r"method=copo is not one of .* choose one of .*coop"):
        check_group_choices(["seed=1", "method=copo"])
    check_group_choices(["method=coop", "federation.rounds=2", "dataset.root=/x"])


def _point(seed: int, method: str = "coop") -> Point:
    return Point(
        name=f"{method}/seed-{seed}",
        overrides=(f"method={method}", f"seed={seed}"),
        labels={"method": method, "seed": seed},
        description=f"method={method} seed={seed}",
    )


class FakeRunner:
    """Writes a summary.json as a finished run would, or fails for the seeds it is told to."""

    def __init__(self, failing=()):
        self.failing = set(failing)
        self.calls = []

    def __call__(self, experiment, overrides, folder):
        self.calls.append(list(overrides))
        seed = int(value_of(overrides, "seed"))
        assert value_of(overrides, "output_dir") == str(folder.resolve())
        if seed in self.failing:
            raise PointFailed("Dataset BTMRI was not found.")
        summary = {"final": {"accuracy": 0.25 * seed}, "seed": seed}
        (folder / "summary.json").write_text(json.dumps(summary))


def test_a_failed_point_is_reported_and_the_grid_goes_on(tmp_path, capsys):
    runner = FakeRunner(failing={2})
    outcomes = run_grid("quickstart", [_point(s) for s in (1, 2, 3)], tmp_path, runner=runner)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].error == "Dataset BTMRI was not found."
    assert outcomes[2].summary["final"]["accuracy"] == 0.75
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[1/3] method=coop seed=1 ... ") and out[0].endswith(
        "s, accuracy 25.0%"
    )
    assert "[2/3] method=coop seed=2 ... failed (" in out[1]
    assert out[1].endswith("Dataset BTMRI was not found.")
    assert "1 of 3 points failed" in out[-1]
    record = json.loads((tmp_path / "coop/seed-2/point.json").read_text())
    assert record["overrides"] == ["method=coop", "seed=2"]


def test_rerunning_resumes_only_the_unfinished_points(tmp_path, capsys):
    points = [_point(s) for s in (1, 2, 3)]
    run_grid("quickstart", points, tmp_path, runner=FakeRunner(failing={2}))
    capsys.readouterr()
    again = FakeRunner()
    outcomes = run_grid("quickstart", points, tmp_path, runner=again)
    assert [value_of(call, "seed") for call in again.calls] == ["2"]
    assert all(o.ok for o in outcomes) and [o.reused for o in outcomes] == [True, False, True]
    out = capsys.readouterr().out
    assert "resuming: 2 of 3 points already have results" in out
    assert "[1/3] method=coop seed=1 ... done before, accuracy 25.0%" in out

    third = FakeRunner()
    run_grid("quickstart", points, tmp_path, runner=third)
    assert third.calls == [] and "all 3 points already have results" in capsys.readouterr().out


def test_a_summary_the_check_rejects_counts_as_failed(tmp_path, capsys):
    def check(point, summary):
        return None if summary["seed"] != 3 else "its summary.json has no final.novel_accuracy."

    outcomes = run_grid(
        "quickstart", [_point(1), _point(3)], tmp_path, runner=FakeRunner(), check=check
    )
    assert [o.ok for o in outcomes] == [True, False]
    out = capsys.readouterr().out
    assert "no final.novel_accuracy" in out and "1 finished runs do not fit this grid" in out


def test_empty_and_duplicate_grids_are_refused(tmp_path):
    with pytest.raises(GridError, match="The grid is empty"):
        run_grid("quickstart", [], tmp_path, runner=FakeRunner())
    with pytest.raises(GridError, match="coop/seed-1 twice"):
        run_grid("quickstart", [_point(1), _point(1)], tmp_path, runner=FakeRunner())


def test_a_folder_holding_another_run_is_refused(tmp_path):
    folder = tmp_path / "coop/seed-1"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    (folder / "point.json").write_text(json.dumps({"overrides": ["method=coop", "seed=9"]}))
    with pytest.raises(GridError, match="holds a run of other settings"):
        run_grid("quickstart", [_point(1)], tmp_path, runner=FakeRunner())


def test_study_folder_holds_one_study(tmp_path):
    identity = {"command": "table", "experiment": "quickstart", "settings": ["federation.rounds=2"]}
    open_study(tmp_path / "study", identity)
    open_study(tmp_path / "study", identity)  # the same study: resume
    other = {**identity, "command": "study privacy"}
    with pytest.raises(GridError) as err:
        open_study(tmp_path / "study", other)
    assert "holds a different study (fedprompt table quickstart federation.rounds=2)" in str(
        err.value
    )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(GridError, match="not empty and holds no fedprompt study"):
        open_study(tmp_path / "busy", identity)


def test_mean_and_sample_std():
    mean, std = mean_and_std([30.0, 40.0, 50.0])
    assert mean == pytest.approx(40.0) and std == pytest.approx(10.0)  # sqrt(200 / 2)
    assert mean_and_std([42.0]) == (42.0, None)
    assert mean_and_std([]) == (None, None)


def test_child_processes_write_to_the_point_log(tmp_path, capfd):
    log = tmp_path / "flower.log"
    with _process_output_to(log):
        subprocess.run([sys.executable, "-c", "print('from flwr run')"], check=True)
    subprocess.run([sys.executable, "-c", "print('back on the terminal')"], check=True)
    assert log.read_text().splitlines() == ["from flwr run"]
    assert capfd.readouterr().out == "back on the terminal\n"


def test_the_serverapps_error_sentence_is_found_in_the_log(tmp_path):
    log = tmp_path / "flower.log"
    log.write_text(
        "\x1b[92mINFO \x1b[0m:      [fedprompt] results folder: /x\n"
        "\x1b[91mERROR \x1b[0m:     [fedprompt] Dataset BTMRI was not found in /data.\n"
    )
    assert _logged_error(log) == "Dataset BTMRI was not found in /data."
    assert _logged_error(tmp_path / "absent.log") is None
