"""Many points in one Flower simulation: the same results as one simulation per point, a failed
point never poisons the next, and each point sees only its own sites."""

import json

import pytest
import torch
from flower_messages import instruction
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from fedprompt.experiments.grid import Point, run_grid, run_point
from fedprompt.federation import client_app
from fedprompt.federation.grid_session import GridPlan, run_plan, tag
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.run_config import PLAN_KEY, default_run_config


def _point(name, *overrides):
    return Point(name, ("federation.rounds=1", *overrides), {"name": name}, name)


GOOD = [_point("central", "seed=1", "federation.num_sites=1"), _point("three", "seed=2")]
BAD = _point("diverges", "train.lr=1e30", "seed=3")


def _lines(folder):
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("seconds")
    return lines


@pytest.mark.slow
@pytest.mark.e2e
def test_one_session_equals_one_simulation_per_point_and_a_failure_stays_its_own(tmp_path):
    single = run_grid("quickstart", GOOD, tmp_path / "single", runner=run_point)
    session = run_grid("quickstart", [GOOD[0], BAD, GOOD[1]], tmp_path / "session")
    assert all(outcome.ok for outcome in single)
    assert [outcome.ok for outcome in session] == [True, False, True]
    assert "diverg" in session[1].error or "loss" in session[1].error
    for point in GOOD:
        ours, theirs = tmp_path / "session" / point.name, tmp_path / "single" / point.name
        assert _lines(ours) == _lines(theirs)
        state, reference = torch.load(ours / "global_state.pt"), torch.load(
            theirs / "global_state.pt"
        )
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert (tmp_path / "session/flower.log").is_file()  # one log for the whole session
    summary = json.loads((tmp_path / "session/central/summary.json").read_text())
    assert summary["num_sites"] == 1 and len(summary["final"]["per_site"]) == 1


def test_each_point_messages_only_its_own_sites_and_starts_with_a_clean_node_state(tmp_path):
    plan = GridPlan(
        "quickstart",
        (
            ("federation.rounds=1", "federation.num_sites=1", f"output_dir={tmp_path / 'a'}"),
            ("federation.rounds=1", f"output_dir={tmp_path / 'b'}"),
        ),
    )
    plan_file = plan.save(tmp_path / "plan.json")
    run_config = default_run_config("quickstart") | {PLAN_KEY: str(plan_file)}
    grid = InProcessGrid([{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
    run_plan(grid, plan)
    first = json.loads((tmp_path / "a/summary.json").read_text())
    second = json.loads((tmp_path / "b/summary.json").read_text())
    assert first["status"] == second["status"] == "completed"
    assert list(first["final"]["per_site"]) == ["site-0"]
    assert sorted(second["final"]["per_site"]) == ["site-0", "site-1", "site-2"]
    kinds = [(r.metadata.message_type, r.metadata.src_node_id) for r in grid.replies]
    assert sorted(kinds[:3]) == [("query", 101), ("query", 102), ("query", 103)]
    trained = [node for kind, node in kinds if kind == "train"]
    assert trained[0] == 101 and sorted(trained[1:]) == [101, 102, 103]  # 1 site, then 3
    # A run already completed in the plan is not run again.
    before = len(grid.replies)
    run_plan(grid, plan)
    assert len(grid.replies) - before == 3  # only the opening query


def test_a_nodes_state_is_cleared_when_the_point_changes():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client_app._enter_point(context, 0)
    context.state[client_app.LEDGER_KEY] = ConfigRecord({"steps": 5})
    client_app._enter_point(context, 0)
    assert client_app.LEDGER_KEY in context.state  # same point: kept
    client_app._enter_point(context, 1)
    assert client_app.LEDGER_KEY not in context.state  # another point: nothing carries over


def test_a_message_naming_a_point_outside_a_session_is_refused(tmp_path):
    plan = GridPlan("quickstart", (("federation.rounds=1", f"output_dir={tmp_path / 'a'}"),))
    plan_file = plan.save(tmp_path / "plan.json")
    for run_config, index in (
        (default_run_config("quickstart"), 0),  # not a session at all
        (default_run_config("quickstart") | {PLAN_KEY: str(plan_file)}, 5),  # no such point
    ):
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 3},
            state=RecordDict(),
            run_config=run_config,
        )
        message = tag([instruction(1, MessageType.QUERY)], index)[0]
        reply = client_app.app(message, context)
        assert reply.has_error() and f"names point {index} of a session" in reply.error.reason
