"""Switches for the authors' quirks: each changes what it says, and is off by default."""

import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import create_learner
from fedprompt.learners.distillation import prompt_set_mask

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _features(learner):
    """Text features through the learner's own prompt path (grouped for the bank methods)."""
    if learner.name == "biovlm":
        return learner.bank_features()
    if learner.name == "cocoop":
        return learner.conditional_text_features(torch.ones(1, learner.backbone.embed_dim))
    return learner.text_features()


@pytest.mark.parametrize("name", ["coop", "biomedcoop", "cocoop", "biovlm"])
def test_text_dropout_acts_only_with_the_switch_and_only_in_training(name, miniature_backbone):
    text = miniature_backbone.model.text
    assert text.config.hidden_dropout_prob > 0
    torch.manual_seed(0)
    plain = create_learner(name, miniature_backbone, CLASSES)
    torch.manual_seed(0)
    switched = create_learner(name, miniature_backbone, CLASSES, text_dropout=True)
    with torch.no_grad():
        plain.eval()
        reference = _features(plain)
        plain.train()
        assert torch.equal(_features(plain), reference)  # default: deterministic in training
        switched.eval()
        assert torch.equal(_features(switched), reference)  # never in eval
        switched.train()
        torch.manual_seed(1)
        first = _features(switched)
        second = _features(switched)
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
    assert not text.training  # the shared tower is back in eval mode after each forward
    switched.eval()
    with torch.no_grad():
        assert torch.equal(_features(switched), reference)


def test_text_dropout_gradients_still_reach_the_context(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES, text_dropout=True).train()
    features = F.normalize(torch.randn(4, miniature_backbone.embed_dim), dim=-1)
    learner.loss(features, torch.arange(4)).backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0


def test_clip_adapter_without_renormalisation_is_the_benchmarks_formula(miniature_backbone):
    torch.manual_seed(0)
    ours = create_learner("clip_adapter", miniature_backbone, CLASSES, ratio=0.5)
    theirs = create_learner(
        "clip_adapter", miniature_backbone, CLASSES, ratio=0.5, renormalize=False
    )
    theirs.load_trainable_state(ours.trainable_state())
    x = F.normalize(torch.randn(3, miniature_backbone.embed_dim), dim=-1)
    first, second = ours.adapter[0].weight, ours.adapter[2].weight
    adapted = torch.relu(torch.relu(x @ first.t()) @ second.t())
    mixed = 0.5 * adapted + 0.5 * x
    scale = miniature_backbone.logit_scale()
    text = ours.text_features()
    with torch.no_grad():
        assert torch.allclose(theirs(x), scale * mixed @ text.t(), atol=1e-6)
        normalised = mixed / mixed.norm(dim=-1, keepdim=True)
        assert torch.allclose(ours(x), scale * normalised @ text.t(), atol=1e-6)
        assert not torch.allclose(ours(x), theirs(x))


def _cosine_by_hand(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


def test_biovlm_paired_cosine_is_the_released_trainers_by_hand(miniature_backbone):
    torch.manual_seed(0)
    learner = create_learner("biovlm", miniature_backbone, CLASSES, bank_size=3, paired_cosine=True)
    attributes = learner.attribute_bank  # (C, A, D)
    count = attributes.shape[1]
    with torch.no_grad():
        bank = learner.bank_features()  # (P, C, D)
        got = learner.attribute_cosine(bank)
    prompts, classes, dim = bank.shape
    assert got.shape == (prompts, dim)
    for p in range(prompts):
        for d in range(dim):
            # Prompt p against attribute p of every class, along the class axis at coordinate d.
            expected = _cosine_by_hand(bank[p, :, d], attributes[:, p % count, d])
            assert torch.isclose(got[p, d], expected, atol=1e-5)
    learner.paired_cosine = False
    with torch.no_grad():
        ours = learner.attribute_cosine(bank)
    assert ours.shape == (prompts, classes)
    for p in range(prompts):
        for c in range(classes):
            expected = _cosine_by_hand(bank[p, c], learner.attribute_means[c])
            assert torch.isclose(ours[p, c], expected, atol=1e-5)


def test_biovlm_paired_cosine_changes_the_loss_only_when_switched(miniature_backbone):
    torch.manual_seed(0)
    ours = create_learner("biovlm", miniature_backbone, CLASSES)
    theirs = create_learner("biovlm", miniature_backbone, CLASSES, paired_cosine=True)
    theirs.load_trainable_state(ours.trainable_state())
    features = F.normalize(torch.randn(4, miniature_backbone.embed_dim), dim=-1)
    views = F.normalize(features.unsqueeze(1) + 0.1 * torch.randn(4, 2, features.shape[1]), dim=-1)
    labels = torch.arange(4)
    with torch.no_grad():
        base = ours.loss(features, labels, views=views)
        switched = theirs.loss(features, labels, views=views)
        ours.cosine_weight = theirs.cosine_weight = 0.0
        assert torch.isclose(
            ours.loss(features, labels, views=views), theirs.loss(features, labels, views=views)
        )
    assert not torch.isclose(base, switched)


def test_the_description_filter_is_a_plain_z_score():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randn(12, generator=generator) * 3 + 1
        for tau in (0.5, 1.0, 1.5):
            z = (scores - scores.mean()) / scores.std()
            keep = z.abs() <= tau
            expected = keep if keep.any() else torch.ones_like(keep)
            assert torch.equal(prompt_set_mask(scores, tau), expected)
