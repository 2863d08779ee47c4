"""Loss-threshold membership inference: rank AUC as defined pairwise, and an attack that works."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedprompt.evaluation.membership_inference import (
    loss_threshold_auc,
    membership_inference_auc,
    per_example_losses,
    rank_auc,
)
from fedprompt.learners import create_learner

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _pairwise_auc(positive, negative):
    """The definition: P(positive > negative) + P(tie) / 2 over all pairs."""
    diff = np.asarray(positive)[:, None] - np.asarray(negative)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def test_rank_auc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        positive = rng.integers(0, 6, size=rng.integers(1, 30)).astype(float)
        negative = rng.integers(0, 6, size=rng.integers(1, 30)).astype(float)
        assert rank_auc(positive, negative) == pytest.approx(_pairwise_auc(positive, negative))


def test_rank_auc_extremes():
    assert rank_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert rank_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert rank_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        rank_auc([], [1.0])


def test_lower_member_losses_give_a_high_attack_auc():
    assert loss_threshold_auc([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]) == 1.0
    assert loss_threshold_auc([0.5, 0.6], [0.1, 0.2]) == 0.0


def test_attack_on_a_prompt_separates_its_training_records(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    text = learner.text_features().detach()
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(len(CLASSES), (40,), generator=generator)
    noise = torch.randn(40, miniature_backbone.embed_dim, generator=generator)
    # "Members" lie close to their class's text feature (low loss), "non-members" far from it.
    members = F.normalize(text[labels[:24]] + 0.05 * noise[:24], dim=-1)
    nonmembers = F.normalize(noise[24:], dim=-1)
    result = membership_inference_auc(learner, members, labels[:24], nonmembers, labels[24:])
    assert result.num_members == result.num_nonmembers == 16
    assert result.auc > 0.75
    assert set(result.as_dict()) == {"auc", "num_members", "num_nonmembers"}

    same = membership_inference_auc(learner, nonmembers, labels[24:], nonmembers, labels[24:])
    assert same.auc == 0.5
    losses = per_example_losses(learner, members, labels[:24], batch_size=5)
    expected = F.cross_entropy(learner(members), labels[:24], reduction="none")
    np.testing.assert_allclose(losses, expected.detach().numpy(), rtol=1e-5)
