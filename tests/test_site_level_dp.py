"""privacy=site_level: Flower's fixed-clipping DP wrappers around the run's strategy."""

import json

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from fedprompt.config import ConfigError, compose_config
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.federation.site_level_dp import (
    replay_releases,
    site_level_spent,
    wrap_site_level,
)
from fedprompt.federation.strategies import build_strategy
from fedprompt.site_rounds import backbone_for, build_learner, splits_and_plan

SETTINGS = ["train.local_epochs=1", "privacy=site_level"]


def _run(folder, rounds, extra=()):
    overrides = [*SETTINGS, f"federation.rounds={rounds}", f"output_dir={folder}", *extra]
    run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}
    grid = InProcessGrid([{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
    return run_federation(grid, compose_config("quickstart", overrides)), grid


def _initial_state():
    cfg = compose_config("quickstart", SETTINGS)
    splits, _ = splits_and_plan(cfg)
    learner = build_learner(cfg, backbone_for(cfg), list(splits.classnames))
    return {k: v.numpy() for k, v in learner.trainable_state().items()}


def _distance(a, b):
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


@pytest.mark.parametrize("side", ["server", "client"])
def test_the_global_prompt_moves_at_most_the_clipping_norm_per_round(tmp_path, side):
    # Noise almost off, so that the aggregate is the clipped average.
    extra = [f"privacy.side={side}", "privacy.clipping_norm=0.001", "privacy.noise_multiplier=1e-6"]
    summary, grid = _run(tmp_path, rounds=1, extra=extra)
    final = {k: v.numpy() for k, v in torch.load(tmp_path / "global_state.pt").items()}
    initial = _initial_state()
    moved = _distance(final, initial)
    assert 0 < moved <= 0.001 * 1.001
    train_replies = [r for r in grid.replies if r.content.array_records]
    assert len(train_replies) == 3
    for reply in train_replies:
        sent = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        metrics = reply.content["metrics"]
        assert metrics["site-weight"] == 1
        if side == "client":  # fixedclipping_mod clipped it at the site
            assert _distance(sent, initial) <= 0.001 * 1.001
    assert summary["site_level_privacy"]["releases"] == 1


def test_epsilon_is_accounted_over_every_round_and_summarised(tmp_path):
    summary, _ = _run(tmp_path, rounds=3)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epsilons = [line["site_level_privacy"]["epsilon"] for line in lines]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert [line["site_level_privacy"]["releases"] for line in lines] == [1, 2, 3]
    entry = summary["site_level_privacy"]
    assert entry["guarantee"] == "site-level" and entry["epsilon"] == epsilons[2]
    assert entry["delta"] == 1e-5 and entry["noise_multiplier"] == 1.0
    assert summary["privacy"] is None  # no record-level guarantee is claimed


def test_replayed_releases_give_the_same_epsilon_as_composed_ones():
    straight = wrap_site_level(FedAvg(), {"noise_multiplier": 1.0, "clipping_norm": 0.1}, 5)
    replay_releases(straight, 4)
    again = wrap_site_level(FedAvg(), {"noise_multiplier": 1.0, "clipping_norm": 0.1}, 5)
    replay_releases(again, 2)
    replay_releases(again, 2)
    assert site_level_spent(straight)["releases"] == 4
    expected = site_level_spent(again)["epsilon"]
    assert site_level_spent(straight)["epsilon"] == pytest.approx(expected)


def test_sides_choose_flowers_wrappers():
    settings = {"noise_multiplier": 1.0, "clipping_norm": 0.1}
    server = wrap_site_level(FedAvg(), settings | {"side": "server"}, 3)
    client = wrap_site_level(FedAvg(), settings | {"side": "client"}, 3)
    assert isinstance(server, DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(client, DifferentialPrivacyClientSideFixedClipping)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"side": "both"}, "privacy.side"),
        ({"noise_multiplier": 0.0}, "must be positive"),
        ({"clipping_norm": -1.0}, "must be positive"),
    ],
)
def test_bad_settings_are_one_sentence(settings, message):
    base = {"noise_multiplier": 1.0, "clipping_norm": 0.1, "side": "server"}
    with pytest.raises(ConfigError, match=message):
        wrap_site_level(FedAvg(), base | settings, 3)


def test_a_strategy_the_accountant_cannot_follow_is_refused():
    fedadam = build_strategy({"name": "fedadam"})
    with pytest.raises(ConfigError, match="strategy=fedavg"):
        wrap_site_level(fedadam, {"noise_multiplier": 1.0, "clipping_norm": 0.1}, 3)


def test_partial_participation_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"fraction_train=1\.0"):
        _run(tmp_path, rounds=1, extra=["federation.fraction_train=0.5"])
