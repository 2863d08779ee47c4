"""The simulation's nodes load their backbone while the server prepares; a node that cannot is
asked again in round 1, and the warm-up changes no result."""

import json
import logging
import time

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from sites_on_disk import write_site

from fedprompt.config import compose_config
from fedprompt.federation import orchestration
from fedprompt.federation.actor_warmup import ActorWarmUp
from fedprompt.federation.client_app import app as fedprompt_app
from fedprompt.federation.grid_wrapper import GridWrapper
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config


def _grid(num_sites=3, apps=None):
    return InProcessGrid(
        [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)],
        default_run_config("quickstart"),
        apps=apps,
    )


def _run(tmp_path, name, grid, warm_up):
    cfg = compose_config("quickstart", ["federation.rounds=2", f"output_dir={tmp_path / name}"])
    run_federation(grid, cfg, warm_up=warm_up)
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("seconds")
    return lines


def _kinds(grid):
    return [(r.metadata.message_type, r.metadata.src_node_id) for r in grid.replies]


def test_every_node_is_asked_before_the_server_loads_its_own_backbone(tmp_path, monkeypatch):
    grid = _grid()
    asked_before: list[list[tuple[str, int]]] = []
    load = orchestration.backbone_for

    def server_backbone(cfg):
        asked_before.append(_kinds(grid))
        return load(cfg)

    monkeypatch.setattr(orchestration, "backbone_for", server_backbone)
    _run(tmp_path, "run", grid, warm_up=True)
    assert sorted(asked_before[0]) == [("query", 101), ("query", 102), ("query", 103)]
    assert all(kind != "query" for kind, _ in _kinds(grid)[3:])  # asked once, then the rounds


def test_the_warm_up_changes_no_result(tmp_path):
    cold, warm = _grid(), _grid()
    assert _run(tmp_path, "warm", warm, warm_up=True) == _run(tmp_path, "cold", cold, False)
    assert not any(kind == "query" for kind, _ in _kinds(cold))
    assert sum(kind == "query" for kind, _ in _kinds(warm)) == 3


def test_a_deployment_sends_no_warm_up(tmp_path):
    """Hospitals connect when they connect; each loads its backbone on its first round."""
    names = ["hospital-a", "hospital-b"]
    overrides = [
        "federation.mode=deployment",
        "federation.num_sites=2",
        "federation.rounds=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    configs = [write_site(tmp_path / name, name, seed=i) for i, name in enumerate(names)]
    grid = InProcessGrid(
        [{"site-config": str(config)} for config in configs],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
        names=names,
    )
    run_federation(grid, compose_config("quickstart", overrides), warm_up=True)
    assert _kinds(grid) and all(kind != "query" for kind, _ in _kinds(grid))


def _refuses_queries(msg, context):
    if msg.metadata.message_type == "query":
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="no"), reply_to=msg)
    return fedprompt_app(msg, context)


class _Silent(GridWrapper):
    """Node 103's answers never arrive (its actor is still starting, or gone)."""

    def pull_messages(self, message_ids):
        replies = self._grid.pull_messages(message_ids)
        return [reply for reply in replies if reply.metadata.src_node_id != 103]


def test_a_node_that_fails_or_never_answers_is_counted_and_waited_for_no_longer(caplog):
    grid = _Silent(_grid(apps={0: _refuses_queries}))
    warming = ActorWarmUp(grid)
    with caplog.at_level(logging.INFO, logger="flwr"):
        started = time.monotonic()
        assert warming.wait(timeout=0.5) == 1
        assert time.monotonic() - started >= 0.5
    assert warming.failed == 1
    assert "1 of 3 sites ready" in caplog.text
    assert "2 site(s) did not get ready (1 failed, 1 did not answer)" in caplog.text


def test_a_node_whose_warm_up_failed_still_trains_in_round_one(tmp_path):
    grid = _grid(apps={0: _refuses_queries})
    lines = _run(tmp_path, "run", grid, warm_up=True)
    assert sorted(lines[0]["aggregated"]) == ["site-0", "site-1", "site-2"]
