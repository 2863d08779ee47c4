from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from fedprompt import site_rounds
from fedprompt.config import compose_config
from fedprompt.data.features import PROCESS_FEATURE_CACHE
from fedprompt.learners.coop import CoOp
from fedprompt.site_rounds import (
    backbone_for,
    build_learner,
    evaluate_round,
    open_site,
    splits_and_plan,
    train_round,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(autouse=True)
def restore_process_cache():
    """Tests reconfigure the process-wide cache; give the next test the settings it had."""
    settings = PROCESS_FEATURE_CACHE.settings
    yield
    PROCESS_FEATURE_CACHE.configure(settings)
    PROCESS_FEATURE_CACHE.clear()


def _update(update):
    """A round's ``(global tensors, stats)``."""
    return update.global_state, update.stats


def _cfg(data_root, cache_dir, *overrides):
    return compose_config(
        None,
        [
            "dataset=synthetic",
            f"dataset.root={data_root}",
            "federation.num_sites=2",
            "train.local_epochs=2",
            f"features.cache_dir={cache_dir}",
            *overrides,
        ],
    )


def _global_state(cfg):
    splits, _ = splits_and_plan(cfg)
    return build_learner(cfg, backbone_for(cfg), list(splits.classnames)).trainable_state()


class _NeedsTokens(CoOp):
    required_inputs = ("views", "patch_tokens")
    seen: ClassVar[list] = []

    def loss(self, image_features, labels, **extras):
        type(self).seen.append({name: tuple(value.shape) for name, value in extras.items()})
        return torch.nn.functional.cross_entropy(self(image_features), labels)


class _Frozen(CoOp):
    needs_training = False


def test_features_are_encoded_once_then_reused_across_rounds_and_processes(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path / "features", "features.views=2")
    state = _global_state(cfg)
    assert PROCESS_FEATURE_CACHE.settings.cache_dir == tmp_path / "features"
    site = open_site(cfg, 0)
    num_train, num_test = len(site.data.train), len(site.data.test)
    before = PROCESS_FEATURE_CACHE.encoded_views
    new_state, stats = _update(train_round(cfg, 0, state, server_round=1))
    assert PROCESS_FEATURE_CACHE.encoded_views - before == 2 * num_train
    assert stats.num_examples == num_train and stats.steps > 0
    assert not torch.equal(new_state["ctx"], state["ctx"])
    train_round(cfg, 0, state, server_round=2)
    evaluate_round(cfg, 0, state)
    evaluate_round(cfg, 0, state)
    assert PROCESS_FEATURE_CACHE.encoded_views - before == 2 * num_train + num_test
    PROCESS_FEATURE_CACHE.clear()  # a fresh process: everything comes from disk
    again, _ = _update(train_round(cfg, 0, state, server_round=1))
    evaluate_round(cfg, 0, state)
    assert PROCESS_FEATURE_CACHE.encoded_views - before == 2 * num_train + num_test
    assert torch.equal(again["ctx"], new_state["ctx"])
    assert len(list((tmp_path / "features").rglob("*.features.pt"))) == 3
    assert not list((tmp_path / "features").rglob("*.tokens.pt"))


def test_patch_tokens_are_cached_only_for_learners_that_need_them(data_root, tmp_path, monkeypatch):
    cfg = _cfg(data_root, tmp_path / "features", "features.views=3")
    state = _global_state(cfg)
    monkeypatch.setattr(
        site_rounds, "build_learner", lambda cfg, backbone, names: _NeedsTokens(backbone, names)
    )
    _NeedsTokens.seen.clear()
    train_round(cfg, 1, state, server_round=1)
    num_train = len(open_site(cfg, 1).data.train)
    assert _NeedsTokens.seen
    for shapes in _NeedsTokens.seen:
        batch = shapes["views"][0]
        assert shapes["views"] == (batch, 3, 32) and shapes["patch_tokens"][0::2] == (batch, 32)
    assert sum(shapes["views"][0] for shapes in _NeedsTokens.seen) == 2 * num_train
    assert len(list((tmp_path / "features").rglob("*.tokens.pt"))) == 3


def test_fedprox_keeps_the_learners_views_and_patch_tokens(data_root, tmp_path, monkeypatch):
    cfg = _cfg(data_root, tmp_path / "features", "features.views=3")
    state = _global_state(cfg)
    monkeypatch.setattr(
        site_rounds, "build_learner", lambda cfg, backbone, names: _NeedsTokens(backbone, names)
    )
    _NeedsTokens.seen.clear()
    plain, _ = _update(train_round(cfg, 1, state, server_round=1))
    _NeedsTokens.seen.clear()
    proximal, _ = _update(train_round(cfg, 1, state, server_round=1, proximal_mu=10.0))
    assert _NeedsTokens.seen and all(
        shapes["views"][1] == 3 and "patch_tokens" in shapes for shapes in _NeedsTokens.seen
    )
    # The proximal term pulls the prompt toward the global one.
    assert (proximal["ctx"] - state["ctx"]).norm() < (plain["ctx"] - state["ctx"]).norm()


def test_a_learner_with_nothing_to_train_encodes_nothing(data_root, tmp_path, monkeypatch):
    cfg = _cfg(data_root, tmp_path / "features")
    state = _global_state(cfg)
    monkeypatch.setattr(
        site_rounds, "build_learner", lambda cfg, backbone, names: _Frozen(backbone, names)
    )
    before = PROCESS_FEATURE_CACHE.encoded_views
    new_state, stats = _update(train_round(cfg, 0, state, server_round=1))
    assert stats.steps == 0 and PROCESS_FEATURE_CACHE.encoded_views == before
    assert torch.equal(new_state["ctx"], state["ctx"])


def test_the_disk_cache_can_be_turned_off(data_root, tmp_path):
    cfg = _cfg(data_root, "false")
    train_round(cfg, 0, _global_state(cfg), server_round=1)
    assert PROCESS_FEATURE_CACHE.settings.cache_dir is None


def test_a_config_without_a_privacy_section_fails_rather_than_training_without_dp():
    dp = compose_config("quickstart", ["privacy=dpsgd", "privacy.epsilon=8"])
    assert site_rounds.privacy_mode(dp) == "dpsgd"
    without = OmegaConf.masked_copy(dp, [key for key in dp if key != "privacy"])
    with pytest.raises(ConfigAttributeError):
        site_rounds.privacy_mode(without)
