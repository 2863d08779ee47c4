"""Personalization schemes: hand-computed PromptFolio and FedPGP features and loss, which tensors
stay at a site, and the refusals of schemes a method or privacy setting cannot carry."""

import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from fedprompt.config import ConfigError, compose_config
from fedprompt.config_schema import CONTEXT_METHODS, check_config
from fedprompt.learners import create_learner
from fedprompt.learners.coop import CoOp
from fedprompt.learners.registry import learner_class, list_learners
from fedprompt.personalization import (
    LOCAL_PREFIX,
    SCHEMES,
    personalization_from_config,
    split_state,
)
from fedprompt.personalization.attach import LocalLoss, attach_local_prompt
from fedprompt.personalization.fedotp import FedOTP, TransportPrompt, partial_transport_plan
from fedprompt.personalization.fedpgp import FedPGP, LowRankPrompt
from fedprompt.personalization.promptfolio import FolioPrompt, PromptFolio
from fedprompt.training import ProximalTerm, train_local

CLASSES = ["glioma", "meningioma", "pituitary", "normal"]


class IdentityEncoder:
    """Stands in for a prompt encoder where the formula, not the text tower, is under test:
    the 'features' of a context are its rows."""

    def encode(self, ctx):
        return ctx


def _site(backbone, n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, backbone.embed_dim, generator=generator), dim=-1)
    return features, torch.arange(n) % len(CLASSES)


TRAIN = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 8, "local_epochs": 1}


def test_promptfolio_mixes_the_normalised_features_by_hand():
    part = FolioPrompt(torch.tensor([[1.0, 0.0]]), mix=0.25)
    mixed = part.text_features(IdentityEncoder(), torch.tensor([[3.0, 4.0]]))
    # 0.75 * (0.6, 0.8) + 0.25 * (1, 0), not normalised again.
    torch.testing.assert_close(mixed, torch.tensor([[0.7, 0.6]]))
    assert part.extra_loss(IdentityEncoder(), torch.tensor([[3.0, 4.0]])) is None


def test_fedpgp_adds_the_low_rank_part_and_its_contrastive_term_by_hand():
    part = LowRankPrompt(
        u=torch.tensor([[2.0]]),
        v=torch.tensor([[1.0, 0.0]]),
        handcrafted=torch.tensor([[1.0, 0.0]]),
        weight=0.5,
        temperature=1.0,
    )
    shared = torch.tensor([[0.0, 1.0]])
    personal = part.text_features(IdentityEncoder(), shared)  # (0, 1) + (2, 0) = (2, 1)
    torch.testing.assert_close(personal, torch.tensor([[2.0, 1.0]]) / math.sqrt(5))
    # positive cos(hand-crafted, global) = 0; negative cos(global, personal) = 1 / sqrt(5).
    expected = 0.5 * math.log(1 + math.exp(1 / math.sqrt(5)))
    loss = part.extra_loss(IdentityEncoder(), shared)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_the_transport_plan_is_pots_partial_entropic_plan():
    generator = torch.Generator().manual_seed(0)
    similarity = 0.2 + 0.6 * torch.rand(4, 7, 2, generator=generator, dtype=torch.float64)
    plans = partial_transport_plan(similarity, eps=0.05, mass=0.8, max_iter=5000, thresh=1e-14)
    for sim, plan in zip(similarity, plans, strict=True):
        reference = ot.partial.entropic_partial_wasserstein(
            np.full(7, 1 / 7), np.full(2, 0.4), (1 - sim).numpy(), reg=0.05, m=0.8
        )
        np.testing.assert_allclose(plan.numpy(), reference, atol=1e-7)
        np.testing.assert_allclose(plan.sum(0).numpy(), [0.4, 0.4], atol=1e-9)  # prompts exact
        assert (plan.sum(1) <= 1 / 7 + 1e-9).all()  # patches bounded


def test_the_transport_score_by_hand():
    # One patch (1, 0); the global prompt's feature (1, 0), the local one's (0, 1): the patch
    # gives 0.4 to each prompt, so the score is 0.4 * 1 + 0.4 * 0.
    part = TransportPrompt(torch.tensor([[0.0, 1.0]]), eps=0.01, mass=0.8, max_iter=100, thresh=0)
    score = part.transport_scores(
        IdentityEncoder(), torch.tensor([[1.0, 0.0]]), torch.tensor([[[1.0, 0.0]]])
    )
    torch.testing.assert_close(score, torch.tensor([[0.4]]))
    # A patch (1, 1) / sqrt(2) meets both prompts at cosine 1 / sqrt(2): 0.8 / sqrt(2) in all.
    logits = part.own_logits(
        IdentityEncoder(), torch.tensor([[1.0, 0.0]]), 10.0, patch_tokens=torch.ones(1, 1, 2)
    )
    torch.testing.assert_close(logits, torch.tensor([[10 * 0.8 / math.sqrt(2)]]))


@pytest.mark.parametrize(
    ("scheme", "local_keys"),
    [
        (PromptFolio(mix=0.4), {"personal.ctx"}),
        (FedPGP(rank=2), {"personal.u", "personal.v"}),
        (FedOTP(), {"personal.ctx"}),
    ],
)
def test_a_site_trains_both_parts_and_only_the_global_one_travels(
    miniature_backbone, scheme, local_keys
):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    start = learner.trainable_state()
    assert attach_local_prompt(scheme, learner, None, torch.Generator().manual_seed(0))
    before = learner.trainable_state()
    features, labels = _site(miniature_backbone)
    tokens = [torch.randn(len(labels), 5, miniature_backbone.embed_dim)]
    trainee = LocalLoss(learner, learner)
    extras = {"patch_tokens": tokens} if "patch_tokens" in trainee.required_inputs else {}
    train_local(trainee, features, labels, TRAIN, seed=0, **extras)
    shared, own = split_state(learner.trainable_state())
    assert set(shared) == set(start) == {"ctx"} and set(own) == local_keys
    assert all(key.startswith(LOCAL_PREFIX) for key in own)
    assert not torch.equal(shared["ctx"], start["ctx"])
    assert all(not torch.equal(own[key], before[key]) for key in own)


def test_saved_local_tensors_are_put_back_and_must_fit(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    saved = {"personal.ctx": torch.full_like(learner.ctx, 0.5)}
    attach_local_prompt(PromptFolio(), learner, saved, torch.Generator().manual_seed(0))
    assert torch.equal(learner.trainable_state()["personal.ctx"], saved["personal.ctx"])
    other = create_learner("coop", miniature_backbone, CLASSES)
    with pytest.raises(ValueError, match=r"personal\.ctx"):
        attach_local_prompt(
            PromptFolio(), other, {"personal.ctx": torch.zeros(3, 3)}, torch.Generator()
        )


def test_a_fresh_local_part_is_the_same_for_the_same_seed(miniature_backbone):
    def part(seed):
        learner = create_learner("coop", miniature_backbone, CLASSES, ctx_init=None)
        attach_local_prompt(FedPGP(), learner, None, torch.Generator().manual_seed(seed))
        return split_state(learner.trainable_state())[1]

    same, again, other = part(1), part(1), part(2)
    assert all(torch.equal(same[k], again[k]) for k in same)
    assert not torch.equal(same["personal.u"], other["personal.u"])


def test_a_method_without_a_context_is_refused_in_one_sentence(miniature_backbone):
    learner = create_learner("cocoop", miniature_backbone, CLASSES)
    with pytest.raises(ValueError, match="needs a CoOp-family method"):
        attach_local_prompt(PromptFolio(), learner, None, torch.Generator())


def test_fedprox_anchors_the_global_tensors_only(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    attach_local_prompt(PromptFolio(), learner, None, torch.Generator().manual_seed(0))
    proximal = ProximalTerm(learner, mu=1.0, anchored=["ctx"])
    assert set(proximal.anchor) == {"ctx"}
    with torch.no_grad():
        learner.personal.ctx.add_(1.0)  # the local part moves: no proximal cost
    features, labels = _site(miniature_backbone)
    assert proximal.loss(features, labels).item() == pytest.approx(
        learner.loss(features, labels).item(), rel=1e-6
    )
    with torch.no_grad():
        learner.ctx.add_(1.0)  # the global part moves: ||1||^2 / 2 per entry
    penalty = proximal.loss(features, labels) - learner.loss(features, labels)
    assert penalty.item() == pytest.approx(0.5 * learner.ctx.numel(), rel=1e-5)


def test_schemes_come_from_their_config_sections():
    assert personalization_from_config(None).name == "none"
    folio = personalization_from_config({"name": "promptfolio", "mix": 0.2})
    assert isinstance(folio, PromptFolio) and folio.mix == 0.2
    for name in SCHEMES:
        section = compose_config(None, [f"personalization={name}"]).personalization
        assert personalization_from_config(dict(section)).name == name
    with pytest.raises(ValueError, match="not a scheme"):
        personalization_from_config({"name": "fedrep"})
    with pytest.raises(ValueError, match="settings it does not have"):
        personalization_from_config({"name": "fedpgp", "mix": 0.5})


def test_the_context_methods_are_the_registered_coop_family():
    family = {name for name in list_learners() if issubclass(learner_class(name), CoOp)}
    assert set(CONTEXT_METHODS) == family


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["personalization=promptfolio", "method=clip_adapter"], "method=clip_adapter does not"),
        (["personalization=fedpgp", "method=cocoop"], "method=cocoop does not have"),
        (["personalization=local_only", "method=zeroshot"], "method=zeroshot does not have"),
        (["personalization=promptfolio", "privacy=dpsgd"], "privacy=dpsgd protects the global"),
        (["personalization=local_only", "privacy=dpsgd"], "personalization=local_only trains"),
        (["personalization=promptfolio", "personalization.mix=1.5"], r"personalization.mix=1.5"),
        (["personalization=fedpgp", "personalization.rank=0"], r"personalization.rank=0"),
        (["personalization=finetune", "personalization.local_epochs=0"], r"local_epochs=0"),
        (["personalization=fedrep"], "Could not find 'personalization/fedrep'|fedrep"),
        (["personalization=fedotp", "method=kgcoop"], "runs with method=coop, not method=kgcoop"),
        (["personalization=fedotp", "personalization.mass=0"], r"personalization.mass=0"),
    ],
)
def test_a_scheme_the_run_cannot_carry_is_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_config(compose_config("quickstart", overrides))
    assert "\n" not in str(caught.value)


def test_schemes_that_fit_pass_the_check():
    for overrides in (
        ["personalization=promptfolio", "method=biomedcoop"],
        ["personalization=fedpgp", "method=kgcoop"],
        ["personalization=local_only", "method=clip_adapter"],
        ["personalization=finetune", "privacy=dpsgd"],
    ):
        check_config(compose_config("quickstart", overrides))
