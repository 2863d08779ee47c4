import pytest
import torch

from fedprompt.learners import create_learner
from fedprompt.learners.coop import CoOp
from fedprompt.training import evaluate, make_optimizer, train_local

TRAIN = {"lr": 0.5, "batch_size": 8, "local_epochs": 5, "optimizer": "sgd", "momentum": 0.9}


def _task(backbone, classnames, per_class=16, seed=0):
    """Image features near each class's hand-written prompt feature: learnable, not trivial."""
    generator = torch.Generator().manual_seed(seed)
    tokens = backbone.tokenizer([f"a photo of a {c}." for c in classnames])
    anchors = backbone.encode_text(tokens)
    labels = torch.arange(len(classnames)).repeat_interleave(per_class)
    noise = torch.randn(len(labels), anchors.shape[1], generator=generator)
    features = anchors[labels] + 0.9 * noise / noise.norm(dim=1, keepdim=True)
    return torch.nn.functional.normalize(features, dim=1), labels


def test_local_training_lowers_the_loss_and_reports_counts(miniature_backbone):
    classnames = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
    learner = create_learner("coop", miniature_backbone, classnames)
    features, labels = _task(miniature_backbone, classnames)
    with torch.no_grad():
        before = learner.loss(features, labels).item()
    stats = train_local(learner, features, labels, TRAIN, seed=0)
    with torch.no_grad():
        after = learner.loss(features, labels).item()
    assert after < before
    assert stats.num_examples == 64 and stats.steps == 5 * 8
    assert evaluate(learner, features, labels, 4).num_test == 64


def test_training_is_repeatable_for_a_seed(miniature_backbone):
    classnames = ["a", "b"]
    features, labels = _task(miniature_backbone, classnames, per_class=6)
    states = []
    for _ in range(2):
        learner = create_learner("coop", miniature_backbone, classnames)
        train_local(learner, features, labels, TRAIN | {"local_epochs": 1}, seed=3)
        states.append(learner.trainable_state()["ctx"])
    assert torch.equal(states[0], states[1])


def test_optimizer_covers_only_trainable_tensors(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, ["a", "b"])
    optimizer = make_optimizer(learner, {"lr": 0.1, "optimizer": "adamw"})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in params) == learner.num_trainable()
    with pytest.raises(ValueError, match=r"train\.optimizer"):
        make_optimizer(learner, {"lr": 0.1, "optimizer": "lbfgs"})


def test_empty_site_and_divergence_are_clear_errors(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, ["a", "b"])
    with pytest.raises(ValueError, match="no training images"):
        train_local(learner, torch.empty(0, 8), torch.empty(0, dtype=torch.long), TRAIN, 0)
    features, labels = _task(miniature_backbone, ["a", "b"], per_class=4)
    with pytest.raises(FloatingPointError, match=r"train\.lr"):
        train_local(learner, features, labels, TRAIN | {"lr": float("nan")}, seed=0)


class _Recorder(CoOp):
    """CoOp that records what the training loop feeds its loss, extras included."""

    required_inputs = ("views", "patch_tokens")

    def __init__(self, backbone, classnames):
        super().__init__(backbone, classnames)
        self.calls = []

    def loss(self, image_features, labels, **extras):
        self.calls.append({"image_features": image_features.detach().clone(), **extras})
        return torch.nn.functional.cross_entropy(self(image_features), labels)


def _views_task(backbone, count=10, num_views=3):
    features, labels = _task(backbone, ["a", "b"], per_class=count // 2)
    noise = torch.randn(
        count, num_views, features.shape[1], generator=torch.Generator().manual_seed(1)
    )
    views = torch.nn.functional.normalize(features[:, None] + 0.3 * noise, dim=-1)
    tokens = [torch.randn(count, 5, 7).half() for _ in range(num_views)]
    return views, labels, tokens


def _fed_views(call):
    """The view index fed for each row of a recorded batch (rows identified by their views)."""
    matches = (call["views"] == call["image_features"][:, None]).all(dim=-1)
    assert (matches.sum(dim=1) == 1).all()
    return matches.int().argmax(dim=1)


def test_each_epoch_feeds_one_seeded_view_per_image_and_the_listed_extras(miniature_backbone):
    views, labels, tokens = _views_task(miniature_backbone)
    chosen_per_run = []
    for _ in range(2):
        learner = _Recorder(miniature_backbone, ["a", "b"])
        train_cfg = TRAIN | {"local_epochs": 4, "batch_size": 4}
        stats = train_local(learner, views, labels, train_cfg, seed=5, patch_tokens=tokens)
        assert stats.steps == 4 * 3 and stats.num_examples == 10
        chosen = []
        for call in learner.calls:
            assert set(call) == {"image_features", "views", "patch_tokens"}
            rows = [int((views == row).all(dim=(1, 2)).nonzero()) for row in call["views"]]
            fed = _fed_views(call)
            expected = torch.stack(
                [tokens[v][r].float() for r, v in zip(rows, fed.tolist(), strict=True)]
            )
            assert call["patch_tokens"].dtype == torch.float32
            assert torch.equal(call["patch_tokens"], expected)
            chosen.extend(zip(rows, fed.tolist(), strict=True))
        chosen_per_run.append(chosen)
    assert chosen_per_run[0] == chosen_per_run[1]
    epochs = [dict(chosen_per_run[0][e * 10 : (e + 1) * 10]) for e in range(4)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(sorted(epoch.items())) for epoch in epochs}) > 1
    assert {v for epoch in epochs for v in epoch.values()} == {0, 1, 2}


def test_a_learner_gets_exactly_the_extras_it_lists(miniature_backbone):
    views, labels, tokens = _views_task(miniature_backbone, num_views=1)

    class ViewsOnly(_Recorder):
        required_inputs = ("views",)

    learner = ViewsOnly(miniature_backbone, ["a", "b"])
    train_local(learner, views[:, 0], labels, TRAIN | {"local_epochs": 1}, seed=0)
    assert all(set(call) == {"image_features", "views"} for call in learner.calls)
    assert all(call["views"].shape[1:] == (1, views.shape[2]) for call in learner.calls)
    plain = create_learner("coop", miniature_backbone, ["a", "b"])
    train_local(plain, views, labels, TRAIN | {"local_epochs": 1}, seed=0, patch_tokens=tokens)
    with pytest.raises(ValueError, match="patch tokens"):
        train_local(_Recorder(miniature_backbone, ["a", "b"]), views, labels, TRAIN, seed=0)

    class Unknown(_Recorder):
        required_inputs = ("depth_map",)

    with pytest.raises(ValueError, match="depth_map"):
        train_local(Unknown(miniature_backbone, ["a", "b"]), views, labels, TRAIN, seed=0)


def test_one_view_trains_exactly_as_plain_features(miniature_backbone):
    features, labels = _task(miniature_backbone, ["a", "b"], per_class=6)
    states = []
    for inputs in (features, features[:, None]):
        learner = create_learner("coop", miniature_backbone, ["a", "b"])
        train_local(learner, inputs, labels, TRAIN | {"local_epochs": 2}, seed=3)
        states.append(learner.trainable_state()["ctx"])
    assert torch.equal(states[0], states[1])


def test_class_text_features_are_computed_once_per_step(miniature_backbone, monkeypatch):
    learner = create_learner("coop", miniature_backbone, ["a", "b"])
    features, labels = _task(miniature_backbone, ["a", "b"], per_class=6)
    calls = []
    original = type(learner).text_features

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(type(learner), "text_features", counted)
    stats = train_local(learner, features, labels, TRAIN | {"local_epochs": 2}, seed=0)
    assert len(calls) == stats.steps
