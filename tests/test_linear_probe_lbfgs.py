"""The papers' linear probe: L-BFGS logistic regression with C chosen on validation, one site."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fedprompt import site_rounds
from fedprompt.config import ConfigError, compose_config
from fedprompt.config_schema import check_config
from fedprompt.learners import create_learner
from fedprompt.learners.linear_probe import C_GRID
from fedprompt.site_rounds import backbone_for, build_learner, splits_and_plan, train_round

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _update(update):
    """A round's ``(global tensors, stats)``."""
    return update.global_state, update.stats


def _clusters(dim, per_class, num_classes, seed, spread=0.3):
    """L2-normalised features around one random centre per class; labels in class order."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = spread * torch.randn(len(labels), dim, generator=generator)
    return F.normalize(centres[labels] + noise, dim=-1), labels


@pytest.mark.parametrize("classes", [CLASSES, CLASSES[:2]])
def test_lbfgs_probe_reaches_sklearns_accuracy(classes, miniature_backbone):
    dim = miniature_backbone.embed_dim
    train_x, train_y = _clusters(dim, 8, len(classes), seed=0)
    val_x, val_y = _clusters(dim, 4, len(classes), seed=1)
    test_x, test_y = _clusters(dim, 50, len(classes), seed=2)
    learner = create_learner("linear_probe", miniature_backbone, classes, solver="lbfgs")
    fit = learner.fit_lbfgs(train_x, train_y, val_x, val_y)
    with torch.no_grad():
        ours = (learner(test_x).argmax(dim=-1) == test_y).float().mean().item()
    direct = LogisticRegression(C=fit.c, solver="lbfgs", max_iter=1000)
    direct.fit(train_x.double().numpy(), train_y.numpy())
    assert ours == pytest.approx(direct.score(test_x.double().numpy(), test_y.numpy()))
    assert ours == 1.0  # the clusters are separable
    with torch.no_grad():
        assert np.array_equal(
            learner(test_x).argmax(dim=-1).numpy(), direct.predict(test_x.double().numpy())
        )


def test_the_chosen_c_is_the_validation_best(miniature_backbone):
    dim = miniature_backbone.embed_dim
    # Class 0 outnumbers the others 4 to 1 in training: a strongly regularised probe predicts it
    # for every image, so small C loses on the balanced validation set.
    train_x, train_y = _clusters(dim, 4, 4, seed=3, spread=1.5)
    extra_x, extra_y = _clusters(dim, 12, 4, seed=5, spread=1.5)
    train_x, train_y = torch.cat([train_x, extra_x[:12]]), torch.cat([train_y, extra_y[:12]])
    val_x, val_y = _clusters(dim, 4, 4, seed=4, spread=1.5)
    learner = create_learner("linear_probe", miniature_backbone, CLASSES, solver="lbfgs")
    fit = learner.fit_lbfgs(train_x, train_y, val_x, val_y)
    assert sorted(fit.val_accuracies) == sorted(C_GRID)
    for c, accuracy in fit.val_accuracies.items():
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=1000)
        model.fit(train_x.double().numpy(), train_y.numpy())
        assert accuracy == pytest.approx(model.score(val_x.double().numpy(), val_y.numpy()))
    best = max(fit.val_accuracies.values())
    assert fit.val_accuracy == best
    assert fit.c == min(c for c, accuracy in fit.val_accuracies.items() if accuracy == best)
    assert fit.val_accuracies[min(C_GRID)] < best < 1.0  # the grid matters on this data
    assert fit.c > min(C_GRID)


def test_sgd_stays_the_default(miniature_backbone):
    assert create_learner("linear_probe", miniature_backbone, CLASSES).solver == "sgd"
    with pytest.raises(ValueError, match="solver"):
        create_learner("linear_probe", miniature_backbone, CLASSES, solver="adam")


def _cfg(tmp_path, *overrides):
    return compose_config(
        None,
        [
            "dataset=synthetic",
            f"dataset.root={tmp_path / 'data'}",
            f"features.cache_dir={tmp_path / 'features'}",
            "method=linear_probe",
            "method.solver=lbfgs",
            "federation.num_sites=1",
            *overrides,
        ],
    )


def test_lbfgs_is_refused_with_several_sites(tmp_path):
    check_config(_cfg(tmp_path))
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(tmp_path, "federation.num_sites=2"))
    message = str(err.value)
    assert "federation.num_sites=1" in message and "\n" not in message
    with pytest.raises(ConfigError, match="privacy=none"):
        check_config(_cfg(tmp_path, "privacy=dpsgd"))
    check_config(_cfg(tmp_path, "federation.num_sites=2", "method.solver=sgd"))


def test_a_site_round_fits_the_probe_once_on_its_features(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    splits, _ = splits_and_plan(cfg)
    start = build_learner(cfg, backbone_for(cfg), list(splits.classnames)).trainable_state()
    monkeypatch.setattr(site_rounds, "train_local", pytest.fail)  # no SGD epochs
    state, stats = _update(train_round(cfg, 0, start, server_round=1))
    assert stats.steps == 0 and 0.0 <= stats.loss <= 1.0
    assert not torch.equal(state["weight"], start["weight"])
    again, _ = _update(train_round(cfg, 0, start, server_round=2))
    assert torch.equal(again["weight"], state["weight"])  # the fit is deterministic
