"""fedprompt table: the grid, centralized beside federated, mean ± std from the runs' summaries."""

import csv
import json
import os

import pytest

from fedprompt.cli import main
from fedprompt.experiments.grid import GridError, PointFailed, value_of
from fedprompt.experiments.table import (
    BASE_TO_NOVEL,
    FEW_SHOT,
    Protocol,
    TableGrid,
    run_table,
    table_grid,
    table_points,
)

GRID = TableGrid(
    methods=("coop", "kgcoop"),
    datasets=("btmri",),
    protocols=(Protocol(FEW_SHOT, 1), Protocol(BASE_TO_NOVEL, 16)),
    seeds=(1, 2),
)
# Accuracy of seed 1; seed 2 is 2 points higher. Hand-computed cells below follow from these.
BASE = {("coop", "central"): 0.50, ("coop", "federated"): 0.40}
BASE |= {("kgcoop", "central"): 0.60, ("kgcoop", "federated"): 0.46}


class FakeRuns:
    """Writes the summary.json a finished run of the point's settings would write."""

    def __init__(self, failing=(), wrong_protocol=()):
        self.failing, self.wrong_protocol = set(failing), set(wrong_protocol)

    def __call__(self, experiment, overrides, folder):
        method, seed = value_of(overrides, "method"), int(value_of(overrides, "seed"))
        setting = "central" if value_of(overrides, "federation.num_sites") == "1" else "federated"
        protocol = value_of(overrides, "protocol")
        if (method, setting, seed) in self.failing:
            raise PointFailed("flwr run exited with code 1 (Flower's log: x).")
        accuracy = BASE[(method, setting)] + 0.02 * (seed - 1)
        base, novel = accuracy + 0.1, accuracy - 0.1
        final = {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy}
        if protocol == BASE_TO_NOVEL:
            hm = 2 * base * novel / (base + novel)
            final |= {"base_accuracy": base, "novel_accuracy": novel, "harmonic_mean": hm}
        if (method, setting, seed) in self.wrong_protocol:
            protocol = "few_shot" if protocol == BASE_TO_NOVEL else BASE_TO_NOVEL
        summary = {
            "final": final,
            "protocol": {"name": protocol, "shots": int(value_of(overrides, "train.shots"))},
            "method": method,
            "dataset": value_of(overrides, "dataset"),
            "seed": seed,
            "num_sites": 1 if setting == "central" else 3,
            "privacy": None,
            "wall_seconds": 1.0,
        }
        (folder / "summary.json").write_text(json.dumps(summary))


def test_points_cross_everything_and_run_each_cell_twice():
    points = table_points(GRID, ["federation.rounds=2"])
    assert len(points) == 2 * 1 * 2 * 2 * 2
    first = points[0]
    assert first.name == "btmri/coop/shots-1/central/seed-1"
    assert first.overrides == (
        "federation.rounds=2",
        "dataset=btmri",
        "method=coop",
        "protocol=few_shot",
        "train.shots=1",
        "seed=1",
        "federation.num_sites=1",
        "partition=iid",
    )
    federated = points[1]
    assert federated.name == "btmri/coop/shots-1/federated/seed-1"
    assert value_of(federated.overrides, "federation.num_sites") is None
    b2n = [p for p in points if p.labels["protocol"] == BASE_TO_NOVEL]
    assert b2n[0].name == "btmri/coop/base-to-novel-16/central/seed-1"
    assert "protocol=base_to_novel" in b2n[0].overrides and "train.shots=16" in b2n[0].overrides


def test_grid_from_options_defaults_to_the_experiments_method_and_dataset():
    grid = table_grid("quickstart", [], shots="1,2,2", seeds="1,2")
    assert grid.methods == ("coop",) and grid.datasets == ("btmri_mini",)
    assert grid.protocols == (Protocol(FEW_SHOT, 1), Protocol(FEW_SHOT, 2))
    assert grid.seeds == (1, 2)
    both = table_grid("quickstart", [], methods="coop,kgcoop", shots="4", base_to_novel=True)
    assert both.protocols[-1] == Protocol(BASE_TO_NOVEL, 16) and both.seeds == (1, 2, 3)


@pytest.mark.parametrize(
    ("options", "overrides", "message"),
    [
        ({"methods": "coop,copo", "shots": "1"}, [], "Unknown method 'copo'; choose from"),
        ({"datasets": "mnist", "shots": "1"}, [], "Unknown dataset 'mnist'"),
        ({}, [], "no protocol; add --shots 1,2,4,8,16 and/or --base-to-novel"),
        ({"shots": "0,1"}, [], "--shots takes integers >= 1"),
        ({"shots": "one"}, [], "--shots takes integers >= 1"),
        ({"shots": "1", "seeds": ""}, [], "--seeds takes integers >= 0"),
        ({"shots": "1"}, ["method=kgcoop"], "sets method itself; choose it with --methods"),
        ({"shots": "1"}, ["train.shots=4"], "sets train.shots itself"),
        ({"shots": "1"}, ["federation.rounds=2,3"], "federation.rounds has several values"),
    ],
)
def test_bad_options_are_one_sentence(options, overrides, message):
    with pytest.raises(GridError) as err:
        table_grid("quickstart", overrides, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def _read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_table_files_hold_mean_and_std_over_seeds(tmp_path, capsys):
    runs = FakeRuns(failing={("kgcoop", "federated", 2)})
    outcomes, md_path, csv_path = run_table("quickstart", GRID, [], tmp_path, runner=runs)
    assert len(outcomes) == 16 and sum(not o.ok for o in outcomes) == 2
    rows = {(r["method"], r["protocol"], r["metric"]): r for r in _read_csv(csv_path)}
    assert len(rows) == 2 * (1 + 3)

    coop = rows[("coop", "few_shot", "accuracy")]
    # central: 50% and 52% -> 51.00 ± 1.41; federated: 40% and 42% -> 41.00 ± 1.41
    assert (coop["central_mean_pct"], coop["central_std_pct"], coop["central_n"]) == (
        "51.00",
        "1.41",
        "2",
    )
    assert (coop["federated_mean_pct"], coop["federated_std_pct"]) == ("41.00", "1.41")
    assert coop["shots"] == "1" and coop["federated_failed"] == "0"

    base = rows[("coop", "base_to_novel", "base_accuracy")]
    assert (base["central_mean_pct"], base["shots"]) == ("61.00", "16")
    hm = rows[("coop", "base_to_novel", "harmonic_mean")]
    per_seed = [2 * (a + 0.1) * (a - 0.1) / (2 * a) for a in (0.50, 0.52)]
    assert float(hm["central_mean_pct"]) == pytest.approx(50 * sum(per_seed), abs=0.005)

    failed = rows[("kgcoop", "few_shot", "accuracy")]
    assert (failed["federated_mean_pct"], failed["federated_std_pct"]) == ("46.00", "")
    assert (failed["federated_n"], failed["federated_failed"]) == ("1", "1")

    table = md_path.read_text()
    assert "| method | 1-shot central | 1-shot federated |" in table
    assert "| coop | 51.0 ± 1.4 | 41.0 ± 1.4 |" in table
    assert "| kgcoop | 61.0 ± 1.4 | 46.0 (1 failed) |" in table
    assert "| method | base central | base federated | novel central | novel federated |" in table
    assert "### Base-to-novel (16 shots)" in table and "## btmri" in table
    assert "3 sites (iid partition" in table  # the quickstart's federation


def test_a_run_that_ignored_its_protocol_is_not_counted(tmp_path, capsys):
    runs = FakeRuns(wrong_protocol={("coop", "central", 1)})
    outcomes, md_path, _ = run_table("quickstart", GRID, [], tmp_path, runner=runs)
    assert sum(not o.ok for o in outcomes) == 2  # its few-shot and its base-to-novel point
    assert "did not apply the protocol" in capsys.readouterr().out
    assert "| coop | 52.0 (1 failed) |" in md_path.read_text()


def test_repeating_the_command_reuses_finished_points(tmp_path, capsys):
    run_table("quickstart", GRID, [], tmp_path, runner=FakeRuns(failing={("coop", "central", 1)}))
    capsys.readouterr()
    _, md_path, _ = run_table("quickstart", GRID, [], tmp_path, runner=FakeRuns())
    assert "resuming: 14 of 16 points already have results" in capsys.readouterr().out
    assert "failed" not in md_path.read_text().split("## btmri")[1]


def test_an_out_folder_of_another_table_is_refused(tmp_path):
    run_table("quickstart", GRID, ["federation.rounds=2"], tmp_path, runner=FakeRuns())
    with pytest.raises(GridError, match="holds a different study"):
        run_table("quickstart", GRID, ["federation.rounds=3"], tmp_path, runner=FakeRuns())


def test_cli_refuses_bad_input_in_one_sentence(tmp_path, capsys):
    # Options and overrides in any order; the unknown method is named.
    argv = ["table", "quickstart", "--methods", "coop,nope", "federation.rounds=2", "--shots", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedprompt: Unknown method 'nope'") and len(err.splitlines()) == 1
    (tmp_path / "study.json").write_text(json.dumps({"command": "study privacy"}))
    assert main(["table", "quickstart", "--shots", "1", "--out", str(tmp_path)]) == 2
    assert "holds a different study" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["table", "quickstart", "--shots", "1", "--no-such-option"])


@pytest.mark.slow
@pytest.mark.e2e
def test_table_end_to_end_on_the_quickstart(tmp_path, capsys):
    out = tmp_path / "table"
    argv = ["table", "quickstart", "--methods", "coop", "--shots", "1", "--seeds", "1"]
    argv += ["--out", str(out), "federation.rounds=1"]
    assert main(argv) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "[1/2] btmri_mini coop 1-shot central seed=1 ..." in printed
    assert "[2/2] btmri_mini coop 1-shot federated seed=1 ..." in printed
    for setting, sites in (("central", 1), ("federated", 3)):
        folder = out / "btmri_mini/coop/shots-1" / setting / "seed-1"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["num_sites"] == sites and summary["rounds"] == 1
        assert summary["protocol"] == {"name": "few_shot", "shots": 1}
        assert os.path.getsize(folder / "flower.log") > 0
    (row,) = _read_csv(out / "table.csv")
    assert row["central_n"] == "1" and row["federated_n"] == "1"
    assert 0 <= float(row["central_mean_pct"]) <= 100
    # Repeating the command runs nothing.
    assert main(argv) == 0
    assert "all 2 points already have results" in capsys.readouterr().out


def test_a_bad_value_stops_the_table_before_its_folder_exists(tmp_path, capsys):
    out = tmp_path / "table"
    command = ["table", "quickstart", "--shots", "1", "--seeds", "1", "--out", str(out)]
    assert main([*command, "train.lr=0"]) == 2
    assert "train.lr=0 is not allowed" in capsys.readouterr().err and not out.exists()
