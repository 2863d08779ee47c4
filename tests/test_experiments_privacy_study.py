"""fedprompt study privacy: the sweep, budgets as privacy groups, CSV, table and plots."""

import csv
import json

import pytest

from fedprompt.cli import main
from fedprompt.config import ConfigError
from fedprompt.experiments.grid import GridError, PointFailed, value_of
from fedprompt.experiments.privacy_study import privacy_points, run_privacy_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP = ["privacy.epsilon=inf,8,1", "seed=1,2", "partition=iid,dirichlet", "method=coop"]


class FakeRuns:
    """Writes summary.json and metrics.jsonl as a finished (private) run would."""

    def __init__(self, failing=(), ignore_privacy=False, clinical=False):
        self.failing, self.ignore_privacy = set(failing), ignore_privacy
        self.clinical = clinical

    def __call__(self, experiment, overrides, folder):
        seed = int(value_of(overrides, "seed") or 0)  # the quickstart's own seed and partition
        partition = value_of(overrides, "partition") or "iid"
        private = value_of(overrides, "privacy") == "dpsgd"
        epsilon = float(value_of(overrides, "privacy.epsilon")) if private else None
        if (partition, epsilon, seed) in self.failing:
            raise PointFailed("flwr run exited with code 1 (Flower's log: x).")
        # 60% without DP, minus 20 points at epsilon 1 and 5 at epsilon 8; seed 2 is 2 higher.
        accuracy = 0.60 - {None: 0.0, 8.0: 0.05, 1.0: 0.20}[epsilon] + 0.02 * (seed - 1)
        sites = {
            f"site-{i}": {
                "epsilon": (epsilon or 0.0) - 0.01 * i,
                "delta": 1e-3,
                "noise_multiplier": 1.0,
                "sample_rate": 0.1,
                "steps": 40,
                "accountant": "prv",
            }
            for i in range(3)
        }
        # A site's own fine-tuned prompt scores 5 points over the global one.
        own = accuracy + 0.05 if value_of(overrides, "personalization") == "finetune" else None
        summary = {
            "final": {
                "accuracy": accuracy,
                "mia_auc": 0.5 + (0.0 if private else 0.1),
                "personalized_accuracy": own,
            },
            "privacy": sites if private and not self.ignore_privacy else None,
            "method": "coop",
            "dataset": "btmri",
            "seed": seed,
            "num_sites": 3,
            "wall_seconds": 1.0,
        }
        rounds = [
            {"round": r, "central": {"accuracy": accuracy * r / 2}, "federated_accuracy": 0.5}
            for r in (1, 2)
        ]
        if self.clinical:  # noise costs calibration: ECE 5% without DP, 15% at epsilon 8
            summary["final"]["ece"] = 0.05 + (0.10 if private else 0.0)
            sensitivity = {"glioma": accuracy - 0.1, "normal": accuracy + 0.1, "other": None}
            summary["final"]["per_class"] = {"sensitivity": sensitivity}
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in rounds))
        (folder / "summary.json").write_text(json.dumps(summary))


def test_budgets_become_privacy_groups_and_the_study_measures_the_attack():
    points, shared = privacy_points("quickstart", [*SWEEP, "federation.rounds=2"])
    assert len(points) == 3 * 2 * 2 and shared == ["federation.rounds=2"]
    first = points[0]
    assert first.name == "coop/iid/eps-inf/seed-1"
    assert first.overrides == (
        "evaluation.membership_inference=true",
        "seed=1",
        "partition=iid",
        "method=coop",
        "federation.rounds=2",
        "privacy=none",
    )
    private = next(p for p in points if p.labels["epsilon"] == "8")
    assert private.overrides[-2:] == ("privacy=dpsgd", "privacy.epsilon=8")
    assert private.description == "method=coop partition=iid seed=1 epsilon=8"


def test_default_budgets_and_the_experiments_own_axes():
    points, _ = privacy_points("quickstart", [])
    assert [p.labels["epsilon"] for p in points] == ["inf", "8", "4", "2", "1"]
    assert {(p.labels["method"], p.labels["partition"], p.labels["seed"]) for p in points} == {
        ("coop", "iid", 0)
    }


def test_other_swept_keys_name_their_points():
    points, _ = privacy_points("quickstart", ["privacy.epsilon=4", "train.lr=0.1,0.01"])
    assert [p.name for p in points] == [
        "coop/iid/train.lr=0.1/eps-4/seed-0",
        "coop/iid/train.lr=0.01/eps-4/seed-0",
    ]
    assert points[1].labels["extras"] == {"train.lr": "0.01"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.epsilon=inf,0"], "privacy.epsilon=0 is not a budget"),
        (["privacy.epsilon=big"], "privacy.epsilon=big is not a budget"),
        (["privacy=dpsgd"], "The study chooses privacy= from the budget"),
        (["method=coop,copo"], "method=copo is not one of fedprompt's method configs"),
        (["seed=1,,2"], "Cannot expand 'seed=1,,2'"),
        (["seed=one"], "seed=one is not an integer"),
    ],
)
def test_bad_sweeps_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as err:
        privacy_points("quickstart", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def _read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_study_writes_csv_table_and_plots(tmp_path, capsys):
    runs = FakeRuns(failing={("dirichlet", 1.0, 2)})
    outcomes, written = run_privacy_study("quickstart", SWEEP, tmp_path, runner=runs)
    assert len(outcomes) == 12 and sum(not o.ok for o in outcomes) == 1
    assert "accuracy 55.0%, epsilon reached 8.00, MIA AUC 0.500" in capsys.readouterr().out

    rows = _read_csv(tmp_path / "privacy.csv")
    assert len(rows) == 12
    row = next(r for r in rows if r["epsilon_target"] == "8" and r["seed"] == "2")
    assert row["method"] == "coop" and row["partition"] == "iid"
    assert row["epsilon_reached"] == "8.0000"  # the largest over the three sites
    assert row["accuracy_pct"] == "57.00" and row["mia_auc"] == "0.5000"
    assert row["status"] == "ok" and row["dataset"] == "btmri"
    no_dp = next(r for r in rows if r["epsilon_target"] == "inf")
    assert no_dp["epsilon_reached"] == "" and no_dp["mia_auc"] == "0.6000"
    failed = next(r for r in rows if r["status"] != "ok")
    assert failed["status"].startswith("failed: flwr run exited with code 1")
    assert failed["accuracy_pct"] == ""

    table = (tmp_path / "privacy.md").read_text()
    # iid, epsilon 8: 55% and 57% -> 56.0 ± 1.4; dirichlet, epsilon 1: only seed 1 finished.
    assert "| coop | iid | 8 | 8.00 | 56.0 ± 1.4 | 0.500 ± 0.000 | 2 |" in table
    assert "| coop | dirichlet | 1 | 1.00 | 40.0 | 0.500 | 1 (1 failed) |" in table
    assert "| coop | iid | inf | - | 61.0 ± 1.4 | 0.600 ± 0.000 | 2 |" in table

    names = sorted(path.name for path in written)
    assert names == [
        "accuracy_per_round-coop-dirichlet.png",
        "accuracy_per_round-coop-iid.png",
        "accuracy_vs_epsilon.png",
        "mia_auc_vs_epsilon.png",
        "privacy.csv",
        "privacy.md",
    ]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC


def test_personalization_is_an_ordinary_override_reported_beside_the_accuracy(tmp_path, capsys):
    sweep = ["privacy.epsilon=inf,8", "personalization=none,finetune"]
    points, _ = privacy_points("quickstart", sweep)
    assert [p.name for p in points[:2]] == [
        "coop/iid/personalization=none/eps-inf/seed-0",
        "coop/iid/personalization=finetune/eps-inf/seed-0",
    ]
    assert "personalization=finetune" in points[3].overrides
    run_privacy_study("quickstart", sweep, tmp_path, runner=FakeRuns())
    assert "accuracy 53.0%, personalized 58.0%, epsilon reached 8.00" in capsys.readouterr().out
    with (tmp_path / "privacy.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[header.index("accuracy_pct") + 1] == "personalized_accuracy_pct"
    rows = {
        (r["personalization"], r["epsilon_target"]): r for r in _read_csv(tmp_path / "privacy.csv")
    }
    # The quickstart's seed 0: 53% at epsilon 8, 58% for the sites' own prompts.
    assert rows[("finetune", "8")]["accuracy_pct"] == "53.00"
    assert rows[("finetune", "8")]["personalized_accuracy_pct"] == "58.00"
    assert rows[("none", "8")]["personalized_accuracy_pct"] == ""
    table = (tmp_path / "privacy.md").read_text()
    assert "| accuracy (%) | personalized accuracy (%) | MIA AUC |" in table
    assert "| coop | iid | finetune | 8 | 8.00 | 53.0 | 58.0 | 0.500 | 1 |" in table
    assert "| coop | iid | none | 8 | 8.00 | 53.0 | - | 0.500 | 1 |" in table
    # Without a scheme anywhere, the columns stay as they were.
    plain = tmp_path / "plain"
    run_privacy_study("quickstart", ["privacy.epsilon=inf"], plain, runner=FakeRuns())
    assert "personalized" not in (plain / "privacy.csv").read_text()


def test_mean_sensitivity_and_ece_beside_the_accuracy_and_ece_against_epsilon(tmp_path):
    sweep = ["privacy.epsilon=inf,8"]
    _, written = run_privacy_study("quickstart", sweep, tmp_path, runner=FakeRuns(clinical=True))
    with (tmp_path / "privacy.csv").open() as handle:
        header = next(csv.reader(handle))
    after = header.index("accuracy_pct")
    assert header[after + 1 : after + 3] == ["mean_sensitivity_pct", "ece_pct"]
    rows = {r["epsilon_target"]: r for r in _read_csv(tmp_path / "privacy.csv")}
    # Seed 0 at epsilon 8: 53% accuracy; sensitivities 43% and 63% (the third class absent).
    assert (rows["8"]["mean_sensitivity_pct"], rows["8"]["ece_pct"]) == ("53.00", "15.00")
    assert rows["inf"]["ece_pct"] == "5.00"
    table = (tmp_path / "privacy.md").read_text()
    assert "| accuracy (%) | mean sensitivity (%) | ECE (%) | MIA AUC |" in table
    assert "| coop | iid | 8 | 8.00 | 53.0 | 53.0 | 15.0 | 0.500 | 1 |" in table
    ece_plot = tmp_path / "plots" / "ece_vs_epsilon.png"
    assert ece_plot in written and ece_plot.read_bytes()[:8] == PNG_MAGIC
    # Runs that report no calibration leave the columns and the plot out.
    plain = tmp_path / "plain"
    _, written = run_privacy_study("quickstart", sweep, plain, runner=FakeRuns())
    with (plain / "privacy.csv").open() as handle:
        assert "ece_pct" not in next(csv.reader(handle))
    assert not (plain / "plots" / "ece_vs_epsilon.png").exists()


def test_a_scheme_dp_cannot_carry_stops_the_study_before_its_folder_exists(tmp_path):
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match="privacy=dpsgd protects the global prompt only"):
        run_privacy_study("quickstart", ["privacy.epsilon=8", "personalization=promptfolio"], out)
    assert not out.exists()


def test_a_run_that_was_not_private_does_not_count(tmp_path, capsys):
    outcomes, _ = run_privacy_study(
        "quickstart", ["privacy.epsilon=inf,8"], tmp_path, runner=FakeRuns(ignore_privacy=True)
    )
    assert [o.ok for o in outcomes] == [True, False]
    assert "records no privacy spending" in capsys.readouterr().out
    assert (
        "| coop | iid | 8 | - | failed | failed | 0 (1 failed) |"
        in (tmp_path / "privacy.md").read_text()
    )


def test_rerun_resumes_and_a_different_study_is_refused(tmp_path, capsys):
    run_privacy_study("quickstart", SWEEP, tmp_path, runner=FakeRuns(failing={("iid", 8.0, 1)}))
    capsys.readouterr()
    run_privacy_study("quickstart", SWEEP, tmp_path, runner=FakeRuns())
    assert "resuming: 11 of 12 points already have results" in capsys.readouterr().out
    with pytest.raises(GridError, match="holds a different study"):
        run_privacy_study(
            "quickstart", [*SWEEP, "federation.rounds=9"], tmp_path, runner=FakeRuns()
        )


def test_cli_bad_budget_is_one_sentence(capsys):
    assert main(["study", "privacy", "quickstart", "privacy.epsilon=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedprompt: privacy.epsilon=-1 is not a budget")
    assert len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.e2e
def test_privacy_study_end_to_end_on_the_quickstart(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "privacy", "quickstart", "--out", str(out), "privacy.epsilon=inf,8"]
    argv += ["seed=1", "federation.rounds=1"]
    assert main(argv) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "[2/2] method=coop partition=iid seed=1 epsilon=8 ..." in printed
    rows = {row["epsilon_target"]: row for row in _read_csv(out / "privacy.csv")}
    assert rows["inf"]["status"] == "ok" and rows["inf"]["epsilon_reached"] == ""
    assert rows["8"]["status"] == "ok" and 0 < float(rows["8"]["epsilon_reached"]) <= 8.0 + 1e-6
    for row in rows.values():
        assert 0 <= float(row["accuracy_pct"]) <= 100 and 0 <= float(row["mia_auc"]) <= 1
    assert (out / "plots" / "accuracy_vs_epsilon.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "plots" / "accuracy_per_round-coop-iid.png").is_file()


def test_a_bad_value_in_any_point_stops_the_study_before_its_folder_exists(tmp_path, capsys):
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match=r"train\.batch_size=0 is not allowed"):
        run_privacy_study("quickstart", ["privacy.epsilon=8", "train.batch_size=0"], out)
    assert not out.exists()
    # Through the command: exit status 2, one sentence.
    assert main(["study", "privacy", "quickstart", "--out", str(out), "train.lr=0"]) == 2
    assert "train.lr=0 is not allowed" in capsys.readouterr().err and not out.exists()
