"""Each `strategy=` choice on hand-made replies against a hand-computed aggregate, and FedProx's
proximal term at the site."""

import numpy as np
import pytest
import torch
from flower_messages import server_task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg
from test_validation import SHAPE, train_reply

from fedprompt.config import ConfigError, compose_config, list_choices
from fedprompt.federation.strategies import STRATEGIES, FedAdam, build_strategy
from fedprompt.site_rounds import backbone_for, build_learner
from fedprompt.training import ProximalTerm


class ThreeNodes:
    def get_node_ids(self):
        return [2, 3, 4]


@pytest.fixture(autouse=True)
def server_identity():
    """Strategies build messages from the process's task identity, as a ServerApp has it."""
    with server_task_identity():
        yield


def _strategy(name, **settings):
    cfg = dict(compose_config(None, [f"strategy={name}"]).strategy) | settings
    return build_strategy(cfg, min_nodes=1, min_available_nodes=1)


def _arrays(value) -> ArrayRecord:
    return ArrayRecord({"ctx": Array(np.asarray(value, np.float32).reshape(SHAPE))})


def _round(strategy, replies, sent=0.0):
    strategy.configure_train(1, _arrays(np.full(SHAPE, sent)), ConfigRecord(), ThreeNodes())
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["ctx"].numpy()


def test_every_strategy_config_builds_its_strategy():
    assert set(list_choices("strategy")) == set(STRATEGIES)
    expected = {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "fedadam": FedAdam,
        "fedmedian": FedMedian,
        "trimmed_mean": FedTrimmedAvg,
    }
    for name, kind in expected.items():
        assert type(_strategy(name)) is kind


def test_unknown_strategy_and_settings_are_one_sentence():
    with pytest.raises(ConfigError, match="choose one of"):
        build_strategy({"name": "krum"})
    with pytest.raises(ConfigError, match=r"configs/strategy/fedavg\.yaml"):
        build_strategy({"name": "fedavg", "eta": 0.1})


def test_fedavg_weights_by_examples():
    replies = [train_reply(2, 1.0, 10), train_reply(3, 2.0, 30), train_reply(4, 4.0, 60)]
    # (10 * 1 + 30 * 2 + 60 * 4) / 100
    np.testing.assert_allclose(_round(_strategy("fedavg"), replies), 3.1)


def test_fedmedian_takes_the_coordinatewise_median():
    values = [[0, 1, 2, 3, 4, 5], [10, 0, 2, 9, 4, 1], [5, 5, 5, 5, 5, 5]]
    replies = [
        train_reply(i + 2, arrays={"ctx": np.float32(v).reshape(SHAPE)})
        for i, v in enumerate(values)
    ]
    expected = [5, 1, 2, 5, 4, 5]
    np.testing.assert_allclose(_round(_strategy("fedmedian"), replies).ravel(), expected)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    # Five sites, beta 0.2: int(0.2 * 5) = 1 value cut at each end of every coordinate.
    columns = [[1, 2, 3, 4, 100], [-50, 0, 1, 2, 3], [7, 7, 7, 7, 7]]
    replies = [
        train_reply(
            site + 2, arrays={"ctx": np.float32([c[site] for c in columns] * 2).reshape(SHAPE)}
        )
        for site in range(5)
    ]
    expected = [(2 + 3 + 4) / 3, (0 + 1 + 2) / 3, 7.0] * 2
    np.testing.assert_allclose(_round(_strategy("trimmed_mean"), replies).ravel(), expected)


def test_fedprox_sends_mu_and_averages_like_fedavg():
    strategy = _strategy("fedprox", proximal_mu=0.25)
    config = ConfigRecord()
    messages = strategy.configure_train(1, _arrays(np.zeros(SHAPE)), config, ThreeNodes())
    assert {m.content["config"]["proximal-mu"] for m in messages} == {0.25}
    replies = [train_reply(2, 1.0, 10), train_reply(3, 3.0, 30)]
    np.testing.assert_allclose(strategy.aggregate_train(1, replies)[0]["ctx"].numpy(), 2.5)


def test_fedadam_takes_one_adam_step_and_keeps_float32():
    strategy = _strategy("fedadam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=0.001)
    replies = [train_reply(2, 1.0, 10), train_reply(3, 3.0, 30)]
    new = _round(strategy, replies, sent=0.5)
    # By hand, round 1 from 0.5: delta = 2.5 - 0.5 = 2; m = 0.1 * 2; v = 0.01 * 4;
    # eta_norm = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2); step = eta_norm * m / (sqrt(v) + tau).
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = 0.5 + eta_norm * 0.2 / (0.2 + 0.001)
    np.testing.assert_allclose(new, expected, rtol=1e-6)
    assert new.dtype == np.float32
    np.testing.assert_allclose(strategy.m_t["ctx"], 0.2)
    np.testing.assert_allclose(strategy.v_t["ctx"], 0.04)


def test_proximal_term_adds_half_mu_times_the_squared_distance():
    cfg = compose_config("quickstart")
    learner = build_learner(cfg, backbone_for(cfg), ["a", "b"])
    wrapped = ProximalTerm(learner, mu=0.5)
    features = torch.nn.functional.normalize(torch.randn(4, learner.backbone.embed_dim), dim=-1)
    labels = torch.tensor([0, 1, 0, 1])
    base = learner.loss(features, labels)
    assert torch.allclose(wrapped.loss(features, labels), base)  # at the anchor
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(0.1)
    moved = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    expected = learner.loss(features, labels) + 0.5 * 0.5 * moved * 0.1**2
    assert torch.allclose(wrapped.loss(features, labels), expected, rtol=1e-4)
    assert [n for n, _ in wrapped.named_parameters()] == [
        f"learner.{n}" for n, p in learner.named_parameters()
    ]
    assert wrapped.backbone is learner.backbone
