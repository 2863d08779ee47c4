"""Which loss terms are private, and which clipping mode each kind of learner gets or is refused."""

import re

import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import Learner
from fedprompt.privacy import CLIPPING_MODES, private_loss, public_loss, resolve_clipping
from fedprompt.privacy.loss_split import (
    has_public_loss,
    has_text_feature_losses,
    private_sample_losses,
)

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor"]


class _Backbone:
    """Just what ``Learner`` reads: a logit scale (no model is needed to split a loss)."""

    embed_dim = 4

    def logit_scale(self):
        return 7.0


class Plain(Learner):
    """Keeps ``Learner.loss``: cross-entropy of the similarities, all private."""

    name = "plain"

    def __init__(self):
        super().__init__(_Backbone(), CLASSES)
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.Parameter(torch.randn(len(CLASSES), 4, generator=generator))

    def text_features(self):
        return F.normalize(self.weights, dim=-1)


class ExtraTerm(Plain):
    """Overrides ``loss`` without saying which of its terms are private."""

    def loss(self, image_features, labels):
        return super().loss(image_features, labels) + self.weights.square().sum()


class Split(Plain):
    """States its split: a public term, and its private terms in both forms."""

    def public_loss(self):
        return self.weights.square().sum()

    def private_sample_losses(self, similarities, labels, image_features, shift):
        return similarities.gather(1, labels[:, None])[:, 0] + shift

    def private_loss(self, image_features, labels, shift):
        return (image_features.sum() + shift).mean()


class PublicOnly(Plain):
    """Declares a public term but cannot say which of its loss terms are private."""

    def public_loss(self):
        return self.weights.sum()


class ImageConditioned(Plain):
    text_feature_only = False


class Coupled(Plain):
    per_sample_loss = False


class CoupledWithNote(Plain):
    per_sample_loss = False
    record_loss_note = "the batch statistic is taken over the record itself"


def _batch():
    generator = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(5, 4, generator=generator), dim=-1)
    return features, torch.tensor([0, 2, 1, 1, 0])


def test_the_modes_are_auto_text_features_and_exact():
    assert CLIPPING_MODES == ("auto", "text_features", "exact")


@pytest.mark.parametrize(
    ("learner", "auto", "text_features", "exact"),
    [
        (Plain, "text_features", "text_features", "exact"),
        (Split, "text_features", "text_features", "exact"),
        (ExtraTerm, "exact", None, "exact"),
        (ImageConditioned, "exact", None, "exact"),
        (CoupledWithNote, "exact", None, "exact"),
    ],
)
def test_each_learner_gets_the_mode_its_loss_allows(learner, auto, text_features, exact):
    instance = learner()
    assert resolve_clipping(instance, "auto") == auto
    assert resolve_clipping(instance, "exact") == exact
    if text_features is None:
        with pytest.raises(ValueError):
            resolve_clipping(instance, "text_features")
    else:
        assert resolve_clipping(instance, "text_features") == text_features


def test_an_unknown_mode_is_refused_with_the_modes_to_use():
    with pytest.raises(ValueError) as error:
        resolve_clipping(Plain(), "Exact")
    assert str(error.value) == (
        "Unknown privacy.clipping 'Exact'; use one of ('auto', 'text_features', 'exact')."
    )


@pytest.mark.parametrize("mode", ["auto", "text_features", "exact"])
def test_a_loss_that_is_not_per_record_cannot_train_privately(mode):
    with pytest.raises(ValueError) as error:
        resolve_clipping(Coupled(), mode)
    assert str(error.value) == (
        "Coupled's loss is not a mean of per-record terms, so DP-SGD cannot bound one record's "
        "influence by clipping; it cannot train with privacy=dpsgd."
    )


@pytest.mark.parametrize(
    ("learner", "sentence"),
    [
        (
            CoupledWithNote,
            "CoupledWithNote's loss couples the records of a batch; under DP it is taken one "
            "record at a time, which needs privacy.clipping=exact (or auto).",
        ),
        (
            ImageConditioned,
            "ImageConditioned's loss reaches its prompt other than through the class text "
            "features (e.g. image-conditioned prompts); set privacy.clipping=exact.",
        ),
        (
            ExtraTerm,
            "ExtraTerm overrides loss() but defines no private_sample_losses(), so text-feature "
            "clipping would drop its extra terms; define it (and public_loss()) or set "
            "privacy.clipping=exact.",
        ),
    ],
)
def test_text_feature_mode_is_refused_in_one_sentence(learner, sentence):
    with pytest.raises(ValueError) as error:
        resolve_clipping(learner(), "text_features")
    assert str(error.value) == sentence


def test_the_text_feature_terms_are_known_unless_loss_is_overridden_alone():
    assert has_text_feature_losses(Plain())
    assert has_text_feature_losses(Split())
    assert not has_text_feature_losses(ExtraTerm())
    extra = ExtraTerm()
    extra.private_sample_losses = lambda similarities, labels, image_features: similarities[:, 0]
    assert has_text_feature_losses(extra)
    assert resolve_clipping(extra, "auto") == "text_features"


def test_public_loss_is_the_learners_own_or_none():
    learner = Split()
    assert not has_public_loss(Plain())
    assert public_loss(Plain()) is None
    assert has_public_loss(learner)
    torch.testing.assert_close(public_loss(learner), learner.weights.square().sum())
    learner.public_loss = lambda: None  # declared, but nothing public this round
    assert has_public_loss(learner) and public_loss(learner) is None


def test_private_sample_losses_default_to_the_cross_entropy_of_learner_loss():
    learner = Plain()
    features, labels = _batch()
    similarities = features @ learner.text_features().t()
    losses = private_sample_losses(learner, similarities, labels, features, {})
    assert losses.shape == (5,)
    torch.testing.assert_close(losses.mean(), learner.loss(features, labels))
    want = F.cross_entropy(7.0 * similarities, labels, reduction="none")
    torch.testing.assert_close(losses, want)


def test_private_sample_losses_are_the_learners_own_with_its_extras():
    learner = Split()
    features, labels = _batch()
    similarities = features @ learner.text_features().t()
    shift = torch.arange(5.0)
    losses = private_sample_losses(learner, similarities, labels, features, {"shift": shift})
    torch.testing.assert_close(losses, similarities[torch.arange(5), labels] + shift)


def test_private_loss_leaves_out_the_public_terms():
    features, labels = _batch()
    split = Split()
    shift = torch.full((5,), 2.0)
    got = private_loss(split, features, labels, {"shift": shift})
    torch.testing.assert_close(got, features.sum() + 2.0)
    plain = Plain()
    torch.testing.assert_close(
        private_loss(plain, features, labels, {}), plain.loss(features, labels)
    )


def test_a_public_term_without_private_loss_is_refused_in_exact_mode():
    features, labels = _batch()
    with pytest.raises(ValueError) as error:
        private_loss(PublicOnly(), features, labels, {})
    assert re.fullmatch(
        r"PublicOnly declares public_loss\(\) but no private_loss\(\); exact DP clipping needs "
        r"the private terms alone\.",
        str(error.value),
    )
