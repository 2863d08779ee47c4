import pytest
import torch

from fedprompt.learners import create_learner
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
