"""fedprompt table: the grid, centralized beside federated, mean ± std from the runs' summaries."""

import csv
import json
import os
from pathlib import Path

import pytest

from fedprompt.cli import main
from fedprompt.config import list_choices
from fedprompt.experiments.grid import (
    GridError,
    Outcome,
    Point,
    PointFailed,
    check_points,
    value_of,
)
from fedprompt.experiments.table import (
    AVERAGES,
    BASE_TO_NOVEL,
    BIOMEDCOOP_DATASETS,
    FEW_SHOT,
    PUBLISHED_COLUMNS,
    TABLE_METRICS,
    Protocol,
    TableGrid,
    harmonic,
    load_published,
    run_table,
    table_grid,
    table_points,
    table_rows,
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
BASE |= {("biomedcoop", "central"): 0.70, ("biomedcoop", "federated"): 0.55}


class FakeRuns:
    """Writes the summary.json a finished run of the point's settings would write."""

    def __init__(self, failing=(), wrong_protocol=(), ignore_scheme=False, clinical=False):
        self.failing, self.wrong_protocol = set(failing), set(wrong_protocol)
        self.ignore_scheme, self.clinical = ignore_scheme, clinical

    def __call__(self, experiment, overrides, folder):
        method, seed = value_of(overrides, "method"), int(value_of(overrides, "seed"))
        setting = "central" if value_of(overrides, "federation.num_sites") == "1" else "federated"
        protocol = value_of(overrides, "protocol")
        if (method, setting, seed) in self.failing:
            raise PointFailed("flwr run exited with code 1 (Flower's log: x).")
        accuracy = BASE[(method, setting)] + 0.02 * (seed - 1)
        if value_of(overrides, "partition") == "dirichlet":
            accuracy -= 0.10
        base, novel = accuracy + 0.1, accuracy - 0.1
        final = {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy}
        # The sites' view: global prompt at the sites 5 points under the central split, each
        # site's own prompt 10 points over it (site-0 +5, site-1 +15), held-out site-2 -10.
        scheme = value_of(overrides, "personalization")
        holdout = int(value_of(overrides, "evaluation.holdout_sites") or 0)
        own = None if scheme in (None, "none") or self.ignore_scheme else accuracy + 0.10
        sites = {
            "site-0": {"accuracy": accuracy - 0.05, "num_test": 10},
            "site-1": {"accuracy": accuracy - 0.05, "num_test": 10},
        }
        if own is not None:
            sites["site-0"]["personalized_accuracy"] = own - 0.05
            sites["site-1"]["personalized_accuracy"] = own + 0.05
        if holdout:
            sites["site-2"] = {"accuracy": accuracy - 0.10, "num_test": 10, "held_out": True}
        final |= {
            "federated_accuracy": accuracy - 0.05,
            "personalized_accuracy": own,
            "unseen_site_accuracy": accuracy - 0.10 if holdout else None,
            "per_site": sites,
        }
        if self.clinical:  # sensitivities 5 points over the accuracy on average; ECE 10%, 11%
            sensitivity = {"glioma": accuracy, "meningioma": accuracy + 0.1, "normal": None}
            final |= {"ece": 0.10 + 0.01 * (seed - 1), "per_class": {"sensitivity": sensitivity}}
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
        ({"shots": "1", "partitions": "iid,dirichelt"}, [], "Unknown partition 'dirichelt'"),
        (
            {"shots": "1", "partitions": "iid+ct"},
            [],
            "--partitions 'iid+ct': after + comes a partition.acquisition (scanner)",
        ),
        ({"shots": "1", "partitions": " , "}, [], "--partitions is empty"),
        ({"shots": "1", "personalization": "folio"}, [], "Unknown personalization 'folio'"),
        ({"shots": "1"}, ["partition=dirichlet"], "sets partition itself; choose it with --parti"),
        ({"shots": "1"}, ["personalization=fedpgp"], "choose it with --personalization"),
        (
            {"shots": "1", "partitions": "iid"},
            ["partition.acquisition=scanner"],
            "give scanners in the partition's name (dirichlet+scanner)",
        ),
        (
            {"shots": "1", "partitions": "iid"},
            ["partition.alpha=0.3"],
            "partition.alpha=0.3 sets a key that none of the table's partition choices (iid) has",
        ),
        (
            {"shots": "1", "personalization": "none,finetune"},
            ["personalization.mix=0.2"],
            "none of the table's personalization choices (none, finetune) has",
        ),
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
    outcomes, md_path, csv_path, plot = run_table("quickstart", GRID, [], tmp_path, runner=runs)
    assert len(outcomes) == 16 and sum(not o.ok for o in outcomes) == 2
    rows = {(r["method"], r["protocol"], r["metric"]): r for r in _read_csv(csv_path)}
    # accuracy; base, novel, HM of means, HM per seed. No run reported personalized or
    # unseen-site accuracy, so the sites' view is left out, and there is no per-site plot.
    assert len(rows) == 2 * (1 + 4)
    assert plot is None and not (tmp_path / "per_site_accuracy.png").exists()

    coop = rows[("coop", "few_shot", "accuracy")]
    # central: 50% and 52% -> 51.00 ± 1.41; federated: 40% and 42% -> 41.00 ± 1.41
    assert (coop["central_mean_pct"], coop["central_std_pct"], coop["central_n"]) == (
        "51.00",
        "1.41",
        "2",
    )
    assert (coop["federated_mean_pct"], coop["federated_std_pct"]) == ("41.00", "1.41")
    assert coop["shots"] == "1" and coop["federated_failed"] == "0"
    assert (coop["partition"], coop["personalization"]) == ("", "")  # not crossed

    base = rows[("coop", "base_to_novel", "base_accuracy")]
    assert (base["central_mean_pct"], base["shots"]) == ("61.00", "16")
    hm = rows[("coop", "base_to_novel", "harmonic_mean")]
    # HM of the mean base (61%) and mean novel (41%); no spread of its own.
    assert float(hm["central_mean_pct"]) == pytest.approx(2 * 61 * 41 / 102, abs=0.005)
    assert (hm["central_std_pct"], hm["central_n"]) == ("", "2")
    per_seed = [2 * (a + 0.1) * (a - 0.1) / (2 * a) for a in (0.50, 0.52)]
    hm_seeds = rows[("coop", "base_to_novel", "harmonic_mean_per_seed")]
    assert float(hm_seeds["central_mean_pct"]) == pytest.approx(50 * sum(per_seed), abs=0.005)
    assert hm_seeds["central_std_pct"] != ""
    # Neither coop nor kgcoop has a published BTMRI number: no paper, no diff.
    assert (coop["paper_pct"], coop["diff_pts"], coop["paper_source"]) == ("", "", "")

    failed = rows[("kgcoop", "few_shot", "accuracy")]
    assert (failed["federated_mean_pct"], failed["federated_std_pct"]) == ("46.00", "")
    assert (failed["federated_n"], failed["federated_failed"]) == ("1", "1")

    table = md_path.read_text()
    assert "| method | 1-shot central | 1-shot federated |" in table
    assert "| coop | 51.0 ± 1.4 | 41.0 ± 1.4 |" in table
    assert "| kgcoop | 61.0 ± 1.4 | 46.0 (1 failed) |" in table
    heads = "| method | base central | base federated | novel central | novel federated | "
    assert (
        heads + "HM central | HM federated | HM per seed central | HM per seed federated |" in table
    )
    assert "paper |" not in table and "## Published numbers" not in table
    assert "### Base-to-novel (16 shots)" in table and "## btmri" in table
    assert "3 sites (iid partition" in table  # the quickstart's federation


def test_mean_sensitivity_and_ece_stand_beside_accuracy_where_runs_report_them(tmp_path, capsys):
    _, md_path, csv_path, _ = run_table(
        "quickstart", GRID, [], tmp_path, runner=FakeRuns(clinical=True)
    )
    rows = {(r["method"], r["protocol"], r["metric"]): r for r in _read_csv(csv_path)}
    assert len(rows) == 2 * (3 + 6)
    sensitivity = rows[("coop", "few_shot", "mean_sensitivity")]
    # coop central: accuracy 50% and 52%, sensitivities average 5 points over it (55%, 57%).
    assert (sensitivity["central_mean_pct"], sensitivity["central_std_pct"]) == ("56.00", "1.41")
    assert sensitivity["federated_mean_pct"] == "46.00"
    ece = rows[("coop", "few_shot", "ece")]
    assert (ece["central_mean_pct"], ece["federated_mean_pct"]) == ("10.50", "10.50")
    assert rows[("coop", "base_to_novel", "ece")]["central_n"] == "2"
    table = md_path.read_text()
    assert (
        "| method | 1-shot central | 1-shot federated | 1-shot mean sensitivity central | "
        "1-shot mean sensitivity federated | 1-shot ECE central | 1-shot ECE federated |"
    ) in table
    assert "| coop | 51.0 ± 1.4 | 41.0 ± 1.4 | 56.0 ± 1.4 | 46.0 ± 1.4 | 10.5 ± 0.7 |" in table
    assert "| HM per seed federated | mean sensitivity (base) central |" in table
    assert "'ECE' the expected calibration error over 15 equal-width confidence bins" in table


def test_a_run_that_ignored_its_protocol_is_not_counted(tmp_path, capsys):
    runs = FakeRuns(wrong_protocol={("coop", "central", 1)})
    outcomes, md_path, _, _ = run_table("quickstart", GRID, [], tmp_path, runner=runs)
    assert sum(not o.ok for o in outcomes) == 2  # its few-shot and its base-to-novel point
    assert "did not apply the protocol" in capsys.readouterr().out
    assert "| coop | 52.0 (1 failed) |" in md_path.read_text()


def test_repeating_the_command_reuses_finished_points(tmp_path, capsys):
    run_table("quickstart", GRID, [], tmp_path, runner=FakeRuns(failing={("coop", "central", 1)}))
    capsys.readouterr()
    _, md_path, _, _ = run_table("quickstart", GRID, [], tmp_path, runner=FakeRuns())
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
    # Two runs: the centralized one, and one federated run with scanners, a personalization
    # scheme and a held-out site, so the sites' view and the per-site plot come from Flower.
    out = tmp_path / "table"
    argv = ["table", "quickstart", "--methods", "coop", "--shots", "1", "--seeds", "1"]
    argv += ["--partitions", "iid+scanner", "--personalization", "local_only"]
    argv += ["--out", str(out), "federation.rounds=1", "evaluation.holdout_sites=1"]
    assert main(argv) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "[1/2] btmri_mini coop 1-shot central seed=1 ..." in printed
    assert (
        "[2/2] btmri_mini coop 1-shot federated partition=iid+scanner "
        "personalization=local_only seed=1 ..."
    ) in printed
    assert "per_site_accuracy.png" in printed
    federated = "federated/partition-iid+scanner/personalization-local_only"
    for setting, sites in (("central", 1), (federated, 3)):
        folder = out / "btmri_mini/coop/shots-1" / setting / "seed-1"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["num_sites"] == sites and summary["rounds"] == 1
        assert summary["protocol"] == {"name": "few_shot", "shots": 1}
    assert os.path.getsize(out / "flower.log") > 0  # one simulation served both runs
    final = summary["final"]  # the federated run's
    assert final["personalized_accuracy"] is not None and final["unseen_site_accuracy"] is not None
    rows = {row["metric"]: row for row in _read_csv(out / "table.csv")}
    assert list(rows) == [
        "accuracy",
        "mean_sensitivity",
        "ece",
        "federated_accuracy",
        "personalized_accuracy",
        "unseen_site_accuracy",
    ]
    assert rows["ece"]["central_n"] == "1" and rows["ece"]["federated_n"] == "1"
    assert (folder / "reliability_diagram.png").is_file()  # each run draws its own
    assert rows["accuracy"]["central_n"] == "1" and rows["accuracy"]["federated_n"] == "1"
    for row in rows.values():
        assert 0 <= float(row["federated_mean_pct"]) <= 100
    assert rows["personalized_accuracy"]["central_n"] == ""
    assert 0 <= float(rows["accuracy"]["central_mean_pct"]) <= 100
    assert (out / "per_site_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Repeating the command runs nothing.
    assert main(argv) == 0
    assert "all 2 points already have results" in capsys.readouterr().out


def test_a_bad_value_stops_the_table_before_its_folder_exists(tmp_path, capsys):
    out = tmp_path / "table"
    command = ["table", "quickstart", "--shots", "1", "--seeds", "1", "--out", str(out)]
    assert main([*command, "train.lr=0"]) == 2
    assert "train.lr=0 is not allowed" in capsys.readouterr().err and not out.exists()


def _outcome(labels, final):
    point = Point(name="x", overrides=(), labels=labels, description="x")
    return Outcome(point, None, {"final": final}, None, 0.0, reused=False)


def test_hm_is_the_harmonic_mean_of_the_mean_base_and_novel():
    grid = TableGrid(("coop",), ("btmri",), (Protocol(BASE_TO_NOVEL, 16),), (1, 2))
    labels = {"dataset": "btmri", "method": "coop", "protocol": BASE_TO_NOVEL, "shots": 16}
    outcomes = []
    for seed, (base, novel) in ((1, (0.9, 0.1)), (2, (0.1, 0.9))):
        hm = 2 * base * novel / (base + novel)  # 0.18 in both seeds
        final = {"base_accuracy": base, "novel_accuracy": novel, "harmonic_mean": hm}
        outcomes.append(_outcome({**labels, "setting": "central", "seed": seed}, final))
    rows = {row.metric: row for row in table_rows(grid, outcomes)}
    # Means over seeds: base 50%, novel 50%, so the HM of the means is 50%; each seed's HM is 18%.
    assert rows["harmonic_mean"].cells["central"].stats() == (pytest.approx(50.0), None)
    assert rows["harmonic_mean"].cells["central"].text() == "50.0"
    assert rows["harmonic_mean_per_seed"].cells["central"].stats() == (
        pytest.approx(18.0),
        pytest.approx(0.0),
    )
    assert rows["harmonic_mean"].cells["federated"].text() == "not run"
    assert harmonic(0.0, 0.0) == 0.0


def _published_rows():
    path = Path(__file__).parents[1] / "fedprompt/experiments/published.csv"
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_published_numbers_load_and_name_their_source():
    rows = _published_rows()
    assert tuple(rows[0]) == PUBLISHED_COLUMNS and len(rows) >= 60
    methods, datasets = set(list_choices("method")), {*list_choices("dataset"), *AVERAGES}
    for row in rows:
        assert row["paper"] and row["table"] and row["source"], row
        assert row["method"] in methods and row["dataset"] in datasets, row
        assert row["protocol"] in TABLE_METRICS and int(row["shots"]) >= 1, row
        assert row["metric"] in {key for key, _ in TABLE_METRICS[row["protocol"]]}, row
        assert 0 < float(row["value"]) <= 100, row
    published = load_published()  # the packaged copy, validated the same way
    assert len(published) == len(rows)
    assert published[("average-11", "biomedcoop", FEW_SHOT, 16, "accuracy")].value == 72.42
    assert published[("average-11", "coop", FEW_SHOT, 1, "accuracy")].value == 50.16
    assert published[("average-10", "zeroshot", BASE_TO_NOVEL, 16, "harmonic_mean")].value == 53.81
    btmri_hm = published[("btmri", "biomedcoop", BASE_TO_NOVEL, 16, "harmonic_mean")]
    assert btmri_hm.value == 89.05 and btmri_hm.source.startswith("https://huggingface.co/")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("source", "", "no paper or no source"),
        ("method", "copo", "unknown method 'copo'"),
        ("protocol", "zero_shot", "unknown protocol 'zero_shot'"),
        ("shots", "0", "shots '0' is not a positive integer"),
        ("metric", "harmonic_mean", "metric 'harmonic_mean' is not one of the few_shot"),
        ("value", "172.4", "value '172.4' is not a percentage"),
    ],
)
def test_a_bad_published_row_is_refused_by_its_line(tmp_path, column, value, message):
    row = {**_published_rows()[0], column: value}
    path = tmp_path / "published.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, PUBLISHED_COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    with pytest.raises(ValueError, match=f"line 2: {message}"):
        load_published(path)


def test_a_centralized_cell_stands_beside_the_published_number(tmp_path, capsys):
    grid = TableGrid(
        ("biomedcoop",), ("btmri",), (Protocol(FEW_SHOT, 1), Protocol(BASE_TO_NOVEL, 16)), (1, 2)
    )
    _, md_path, csv_path, _ = run_table("quickstart", grid, [], tmp_path, runner=FakeRuns())
    rows = {(r["protocol"], r["metric"]): r for r in _read_csv(csv_path)}
    # Central 1-shot: 70% and 72% -> 71.00; the released BTMRI K=1 score is 65.10.
    one_shot = rows[(FEW_SHOT, "accuracy")]
    assert (one_shot["paper_pct"], one_shot["diff_pts"]) == ("65.10", "5.90")
    assert one_shot["paper_source"] == "https://huggingface.co/TahaKoleilat/BiomedCoOp"
    hm = rows[(BASE_TO_NOVEL, "harmonic_mean")]  # base 81%, novel 61%
    assert float(hm["diff_pts"]) == pytest.approx(2 * 81 * 61 / 142 - 89.05, abs=0.005)
    assert rows[(BASE_TO_NOVEL, "harmonic_mean_per_seed")]["paper_pct"] == ""
    table = md_path.read_text()
    assert "| method | 1-shot central | 1-shot paper | 1-shot diff | 1-shot federated |" in table
    assert "| biomedcoop | 71.0 ± 1.4 | 65.10 | +5.90 | 56.0 ± 1.4 |" in table
    assert "HM per seed central | HM per seed federated |" in table  # no paper: no columns
    assert "## Published numbers" in table and "TahaKoleilat/BiomedCoOp" in table


def test_the_papers_averages_over_their_datasets_meet_their_published_numbers():
    datasets = BIOMEDCOOP_DATASETS
    grid = TableGrid(
        ("coop",), datasets, (Protocol(FEW_SHOT, 1), Protocol(BASE_TO_NOVEL, 16)), (1,)
    )
    outcomes = []
    for index, dataset in enumerate(datasets):  # dataset i scores 40 + i percent everywhere
        accuracy = (40 + index) / 100
        for protocol, shots in ((FEW_SHOT, 1), (BASE_TO_NOVEL, 16)):
            labels = {"dataset": dataset, "method": "coop", "protocol": protocol, "shots": shots}
            final = {"accuracy": accuracy, "base_accuracy": accuracy}
            final |= {"novel_accuracy": accuracy, "harmonic_mean": accuracy}
            outcomes.append(_outcome({**labels, "setting": "central", "seed": 1}, final))
    rows = table_rows(grid, outcomes, load_published())
    by_name = {(row.dataset, row.protocol.name, row.metric): row for row in rows}
    few_shot = by_name[("average-11", FEW_SHOT, "accuracy")]
    assert few_shot.cells["central"].stats() == (pytest.approx(45.0), None)  # 40..50
    assert few_shot.published.value == 50.16 and few_shot.diff() == pytest.approx(-5.16)
    assert few_shot.cells["federated"].text() == "not run"
    hm = by_name[("average-10", BASE_TO_NOVEL, "harmonic_mean")]  # BUSI (41) left out
    assert hm.cells["central"].stats()[0] == pytest.approx((sum(range(40, 51)) - 41) / 10)
    assert hm.published.value == 67.23
    assert ("average-10", FEW_SHOT, "accuracy") not in by_name
    # A dataset short leaves the average undefined rather than averaging fewer.
    short = table_rows(TableGrid(("coop",), datasets[1:], grid.protocols, (1,)), outcomes)
    assert not any(row.dataset.startswith("average") for row in short)
    missing = [o for o in outcomes if o.point.labels["dataset"] != "kvasir"]
    (average,) = [
        row
        for row in table_rows(grid, missing)
        if row.dataset == "average-11" and row.metric == "accuracy"
    ]
    assert average.cells["central"].stats() == (None, None)


def test_the_recipe_goes_to_centralized_points_only():
    grid = TableGrid(("coop",), ("btmri",), (Protocol(FEW_SHOT, 1),), (1,), recipe="paper")
    central, federated = table_points(grid, ["federation.rounds=2"])
    assert central.overrides[-3:] == ("federation.num_sites=1", "partition=iid", "recipe=paper")
    assert value_of(federated.overrides, "recipe") is None
    without = TableGrid(("coop",), ("btmri",), (Protocol(FEW_SHOT, 1),), (1,))
    assert all(value_of(p.overrides, "recipe") is None for p in table_points(without, []))


def test_a_recipe_table_is_its_own_study(tmp_path, capsys):
    grid = TableGrid(("coop",), ("btmri",), (Protocol(FEW_SHOT, 1),), (1,), recipe="paper")
    _, md_path, _, _ = run_table("quickstart", grid, [], tmp_path, runner=FakeRuns())
    table = md_path.read_text()
    assert "--recipe paper" in table and "whole training split under recipe=paper" in table
    plain = TableGrid(("coop",), ("btmri",), (Protocol(FEW_SHOT, 1),), (1,))
    with pytest.raises(GridError, match="holds a different study"):
        run_table("quickstart", plain, [], tmp_path, runner=FakeRuns())


def test_an_unknown_recipe_or_a_second_recipe_is_one_sentence(capsys):
    with pytest.raises(GridError, match="Unknown recipe 'nosuch'; choose from"):
        table_grid("quickstart", [], shots="1", recipe="nosuch")
    with pytest.raises(GridError, match="drop the recipe= override"):
        table_grid("quickstart", ["recipe=paper"], shots="1", recipe="paper")
    assert main(["table", "quickstart", "--shots", "1", "--recipe", "nosuch"]) == 2
    assert "Unknown recipe 'nosuch'" in capsys.readouterr().err


@pytest.mark.skipif(
    "paper" not in list_choices("recipe"), reason="no configs/recipe/paper.yaml yet"
)
def test_the_paper_recipe_composes_for_every_centralized_point():
    grid = table_grid("quickstart", [], methods="coop", shots="1", seeds="1", recipe="paper")
    assert grid.recipe == "paper"
    check_points("quickstart", table_points(grid, []))


AXES = TableGrid(
    methods=("coop",),
    datasets=("btmri",),
    protocols=(Protocol(FEW_SHOT, 1),),
    seeds=(1, 2),
    partitions=("iid", "dirichlet+scanner"),
    personalizations=("none", "promptfolio"),
)


def test_partitions_and_schemes_cross_the_federated_points_only():
    points = table_points(AXES, ["federation.rounds=2"])
    assert len(points) == 2 * (1 + 2 * 2)  # per seed: one centralized point, four federated
    assert [p.name.removeprefix("btmri/coop/shots-1/") for p in points[:5]] == [
        "central/seed-1",
        "federated/partition-iid/personalization-none/seed-1",
        "federated/partition-iid/personalization-promptfolio/seed-1",
        "federated/partition-dirichlet+scanner/personalization-none/seed-1",
        "federated/partition-dirichlet+scanner/personalization-promptfolio/seed-1",
    ]
    # The centralized point is the very run a table without the axes makes, so it is shared.
    assert points[0].overrides == table_points(GRID, ["federation.rounds=2"])[0].overrides
    last = points[4]
    assert last.overrides[-3:] == (
        "partition=dirichlet",
        "partition.acquisition=scanner",
        "personalization=promptfolio",
    )
    assert (last.labels["partition"], last.labels["personalization"]) == (
        "dirichlet+scanner",
        "promptfolio",
    )
    assert last.description == (
        "btmri coop 1-shot federated partition=dirichlet+scanner personalization=promptfolio seed=1"
    )


def test_a_groups_own_keys_go_only_to_the_points_whose_choice_has_them():
    overrides = ["partition.alpha=0.3", "personalization.mix=0.2", "evaluation.holdout_sites=1"]
    points = {
        p.name.removeprefix("btmri/coop/shots-1/"): p.overrides
        for p in table_points(AXES, overrides)
        if p.labels["seed"] == 1
    }
    central = points["central/seed-1"]
    assert "partition.alpha=0.3" not in central and "personalization.mix=0.2" not in central
    assert value_of(central, "evaluation.holdout_sites") == "0"  # one site holds none out
    iid_none = points["federated/partition-iid/personalization-none/seed-1"]
    assert iid_none[:1] == ("evaluation.holdout_sites=1",)
    iid_folio = points["federated/partition-iid/personalization-promptfolio/seed-1"]
    assert iid_folio[:2] == ("personalization.mix=0.2", "evaluation.holdout_sites=1")
    scanner_none = points["federated/partition-dirichlet+scanner/personalization-none/seed-1"]
    assert scanner_none[:2] == ("partition.alpha=0.3", "evaluation.holdout_sites=1")
    scanner = points["federated/partition-dirichlet+scanner/personalization-promptfolio/seed-1"]
    assert scanner[:3] == tuple(overrides)
    # Every point composes and passes the config checks, the centralized one included.
    check_points("quickstart", table_points(AXES, overrides))


def test_partitions_and_schemes_from_the_options():
    grid = table_grid(
        "quickstart",
        ["partition.alpha=0.3"],
        shots="1",
        partitions="iid, dirichlet+scanner,iid",
        personalization="none,promptfolio",
    )
    assert grid.partitions == ("iid", "dirichlet+scanner")
    assert grid.personalizations == ("none", "promptfolio")
    plain = table_grid("quickstart", [], shots="1")
    assert (plain.partitions, plain.personalizations) == ((), ())


def test_the_sites_view_stands_beside_the_accuracy(tmp_path, capsys):
    grid = TableGrid(
        ("coop",),
        ("btmri",),
        (Protocol(FEW_SHOT, 1),),
        (1, 2),
        partitions=("iid", "dirichlet"),
        personalizations=("none", "promptfolio"),
    )
    overrides = ["evaluation.holdout_sites=1"]
    outcomes, md_path, csv_path, plot = run_table(
        "quickstart", grid, overrides, tmp_path, runner=FakeRuns()
    )
    assert len(outcomes) == 2 * 5 and all(o.ok for o in outcomes)
    assert "accuracy 40.0%, personalized 50.0%, unseen sites 30.0%" in capsys.readouterr().out
    rows = {(r["partition"], r["personalization"], r["metric"]): r for r in _read_csv(csv_path)}
    assert len(rows) == 4 * 4  # accuracy, then global at the sites, personalized, unseen sites

    def federated(partition, scheme, metric):
        row = rows[(partition, scheme, metric)]
        return row["federated_mean_pct"], row["federated_std_pct"], row["federated_n"]

    # Federated seeds 40% and 42% (dirichlet 10 points lower); the sites see the global prompt
    # 5 points lower, their own prompt 10 points higher, the held-out site 10 points lower.
    assert federated("iid", "none", "accuracy") == ("41.00", "1.41", "2")
    assert federated("iid", "none", "federated_accuracy") == ("36.00", "1.41", "2")
    assert federated("iid", "none", "personalized_accuracy") == ("", "", "0")
    assert federated("iid", "none", "unseen_site_accuracy") == ("31.00", "1.41", "2")
    assert federated("iid", "promptfolio", "personalized_accuracy") == ("51.00", "1.41", "2")
    assert federated("dirichlet", "promptfolio", "personalized_accuracy")[0] == "41.00"
    assert federated("dirichlet", "promptfolio", "unseen_site_accuracy")[0] == "21.00"
    # The centralized run is shared by every row; the sites' view has no centralized cell.
    assert {rows[(p, s, "accuracy")]["central_mean_pct"] for p, s, _ in rows} == {"51.00"}
    folio = rows[("iid", "promptfolio", "personalized_accuracy")]
    assert (folio["central_mean_pct"], folio["central_n"]) == ("", "")

    table = md_path.read_text()
    assert (
        "| method | partition | personalization | 1-shot central | 1-shot federated | "
        "1-shot global (sites) | 1-shot personalized | 1-shot unseen sites |"
    ) in table
    assert "| coop | iid | none | 51.0 ± 1.4 | 41.0 ± 1.4 | 36.0 ± 1.4 | - | 31.0 ± 1.4 |" in table
    assert (
        "| coop | dirichlet | promptfolio | 51.0 ± 1.4 | 31.0 ± 1.4 | 26.0 ± 1.4 | 41.0 ± 1.4 "
        "| 21.0 ± 1.4 |"
    ) in table
    assert "--partitions iid,dirichlet --personalization none,promptfolio" in table
    assert "3 sites (the row's partition, fedavg), the last 1 held out of training as" in table
    assert plot == tmp_path / "per_site_accuracy.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "`per_site_accuracy.png`" in table


def test_a_sites_column_no_run_reported_is_left_out():
    grid = TableGrid(("coop",), ("btmri",), (Protocol(FEW_SHOT, 1),), (1,))
    labels = {"dataset": "btmri", "method": "coop", "protocol": FEW_SHOT, "shots": 1, "seed": 1}
    final = {"accuracy": 0.5, "federated_accuracy": 0.45, "personalized_accuracy": None}
    central = _outcome({**labels, "setting": "central"}, final)
    held_out = _outcome({**labels, "setting": "federated"}, final | {"unseen_site_accuracy": 0.3})
    rows = {row.metric: row for row in table_rows(grid, [central, held_out])}
    assert list(rows) == ["accuracy", "federated_accuracy", "unseen_site_accuracy"]
    assert set(rows["unseen_site_accuracy"].cells) == {"federated"}
    assert rows["unseen_site_accuracy"].cells["federated"].text() == "30.0"
    plain = _outcome({**labels, "setting": "federated"}, final)
    assert [row.metric for row in table_rows(grid, [central, plain])] == ["accuracy"]


def test_a_run_that_did_not_personalize_is_not_counted(tmp_path, capsys):
    grid = TableGrid(
        ("coop",), ("btmri",), (Protocol(FEW_SHOT, 1),), (1,), personalizations=("promptfolio",)
    )
    outcomes, md_path, _, plot = run_table(
        "quickstart", grid, [], tmp_path, runner=FakeRuns(ignore_scheme=True)
    )
    assert [o.ok for o in outcomes] == [True, False]
    assert "personalization=promptfolio did not run" in capsys.readouterr().out
    assert "| coop | promptfolio | 50.0 | failed |" in md_path.read_text() and plot is None


def test_cli_refuses_a_bad_partition_or_scheme_in_one_sentence(capsys):
    assert main(["table", "quickstart", "--shots", "1", "--partitions", "iid+ct"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedprompt: --partitions 'iid+ct'") and len(err.splitlines()) == 1
    assert main(["table", "quickstart", "--shots", "1", "--personalization", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedprompt: Unknown personalization 'nope'; choose from fedotp")
