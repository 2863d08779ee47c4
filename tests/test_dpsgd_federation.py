"""privacy=dpsgd through the real ClientApp and strategy: ledgers, epsilon, summary, budget."""

import json

import pytest
import torch

from fedprompt.config import compose_config
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.federation.run_monitor import RunFailed
from fedprompt.privacy.ledger import SiteLedger
from fedprompt.site_rounds import open_site

SETTINGS = ["train.local_epochs=1", "privacy=dpsgd", "privacy.deterministic=true"]


def _run(folder, rounds, extra=()):
    overrides = [*SETTINGS, f"federation.rounds={rounds}", f"output_dir={folder}", *extra]
    run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}
    grid = InProcessGrid([{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
    return run_federation(grid, compose_config("quickstart", overrides)), grid


def _lines(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_epsilon_grows_every_round_and_the_summary_matches_each_site_ledger(tmp_path):
    summary, grid = _run(tmp_path, rounds=3)
    lines = _lines(tmp_path)
    sites = sorted(lines[0]["sites"])
    assert sorted(summary["privacy"]) == sites == ["site-0", "site-1", "site-2"]
    for name in sites:
        epsilons = [line["sites"][name]["dp_epsilon"] for line in lines]
        assert 0 < epsilons[0] < epsilons[1] < epsilons[2] <= 8.0
        steps = [line["sites"][name]["dp_steps"] for line in lines]
        assert steps[1] == 2 * steps[0] and steps[2] == 3 * steps[0]
        # Nothing the DP guarantee does not cover leaves the site: no training loss.
        assert all(line["sites"][name]["train_loss"] is None for line in lines)
        ledger = SiteLedger.load(tmp_path / "sites" / name / "privacy_ledger.json")
        entry = summary["privacy"][name]
        assert set(entry) == {
            "epsilon",
            "delta",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "accountant",
        }
        assert entry["steps"] == ledger.steps == steps[2]
        assert entry["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)
        assert entry["accountant"] == "prv"
        assert entry["delta"] < 1 / ledger.num_records
    assert all(line["num_trained"] == 3 and line["train_loss"] is None for line in lines)
    # The node state holds the same ledger as the file beside the site's checkpoint.
    for context in grid.contexts.values():
        saved = SiteLedger.from_dict(dict(context.state.config_records["privacy-ledger"]))
        assert saved.steps == steps[2]


def test_a_site_whose_budget_is_spent_stops_and_is_left_out(tmp_path):
    cfg = compose_config("quickstart", [*SETTINGS, "federation.rounds=3"])
    noise = 0.8
    # A budget between the epsilon of one round and of two rounds at every site.
    one, two = [], []
    for index in range(3):
        records = len(open_site(cfg, index).data.train)
        ledger = SiteLedger.plan(
            target_epsilon=100.0,
            num_records=records,
            batch_size=int(cfg.train.batch_size),
            rounds=3,
            local_epochs=1,
            noise_multiplier=noise,
        )
        round_steps = ledger.steps_per_round(1)
        one.append(ledger.epsilon(extra_steps=round_steps))
        two.append(ledger.epsilon(extra_steps=2 * round_steps))
    assert max(one) < min(two)
    budget = (max(one) + min(two)) / 2
    extra = [f"privacy.epsilon={budget}", f"privacy.noise_multiplier={noise}"]

    # Round 2 finds every budget spent: nothing trains, so the run ends there as failed.
    with pytest.raises(RunFailed, match="Round 2 aggregated no site's update"):
        _run(tmp_path / "three", rounds=3, extra=extra)
    lines = _lines(tmp_path / "three")
    assert [line["round"] for line in lines] == [1, 2]
    assert lines[0]["withheld"] == {} and lines[0]["num_trained"] == 3
    assert sorted(lines[1]["withheld"]) == ["site-0", "site-1", "site-2"]
    assert all("privacy budget spent" in reason for reason in lines[1]["withheld"].values())
    assert lines[1]["num_trained"] == 0
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["status"] == "failed" and "privacy budget spent" in summary["reason"]
    for name, site in lines[1]["sites"].items():
        assert site["dp_epsilon"] <= budget
        assert site["dp_steps"] == lines[0]["sites"][name]["dp_steps"]
    # The prompt after round 2 is the prompt after round 1: no exhausted reply was averaged in.
    _run(tmp_path / "one", rounds=1, extra=extra)
    after_one = torch.load(tmp_path / "one" / "global_state.pt", weights_only=True)
    after_two = torch.load(tmp_path / "three" / "global_state.pt", weights_only=True)
    for key in after_one:
        assert torch.equal(after_one[key], after_two[key])


def test_membership_inference_auc_is_reported_per_site_and_in_the_summary(tmp_path):
    summary, _ = _run(tmp_path, rounds=1, extra=["evaluation.membership_inference=true"])
    aucs = [site["mia_auc"] for site in _lines(tmp_path)[0]["sites"].values()]
    assert len(aucs) == 3 and all(0.0 <= auc <= 1.0 for auc in aucs)
    assert summary["final"]["mia_auc"] == pytest.approx(sum(aucs) / 3)


def test_without_dp_there_is_no_privacy_entry_and_no_attack(tmp_path):
    overrides = ["train.local_epochs=1", "federation.rounds=1", f"output_dir={tmp_path}"]
    run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}
    grid = InProcessGrid([{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
    summary = run_federation(grid, compose_config("quickstart", overrides))
    assert summary["privacy"] is None and summary["site_level_privacy"] is None
    assert summary["final"]["mia_auc"] is None
    line = _lines(tmp_path)[0]
    assert all(site["dp_epsilon"] is None for site in line["sites"].values())
    assert line["train_loss"] is not None
