"""Each method's loss terms against small cases worked out by hand."""

import math

import pytest
import torch

from fedprompt.learners.biovlm import low_entropy_mean, marginal_entropy
from fedprompt.learners.distillation import (
    class_graph,
    gad_loss,
    kl_to_teacher,
    lgd_loss,
    prompt_set_mask,
    sccm_loss,
    smoothed_teacher,
    top_patches,
)
from fedprompt.learners.kgcoop import knowledge_guidance_loss
from fedprompt.learners.ogkd import joint_space_patches
from fedprompt.learners.prograd import distillation_loss, project_gradient
from fedprompt.learners.vmfcoop import (
    anchor_loss,
    annealed_temperature,
    fit_vmf,
    fuse_vmf,
    spherical_contrastive_loss,
    symmetric_cross_entropy,
)

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float())


def test_sccm_is_the_mean_squared_error_over_all_entries():
    # (1-0)^2 + (0-1)^2 + 0 + 0 over 4 entries
    close(sccm_loss(torch.stack([E1, E2]), torch.stack([E2, E2])), 0.5)


def test_kdsp_sums_kl_and_divides_by_the_number_of_logits():
    # student uniform over 2 classes, teacher (0.8, 0.2): KL = 0.8 ln(1.6) + 0.2 ln(0.4), / 2 logits
    teacher = torch.log(torch.tensor([[0.8, 0.2]]))
    close(
        kl_to_teacher(torch.zeros(1, 2), teacher), (0.8 * math.log(1.6) + 0.2 * math.log(0.4)) / 2
    )
    close(
        kl_to_teacher(
            torch.tensor([[1.0, -2.0]]), torch.log_softmax(torch.tensor([[1.0, -2.0]]), -1)
        ),
        0,
    )


def test_prompt_set_filter_drops_the_outlying_set():
    # median 3, MAD median(2,1,0,1,97) = 1, z = (-2,-1,0,1,97); mean 19, std sqrt(7610/4) = 43.62:
    # standardised 97 -> 1.79 > 1.5 (dropped), -2 -> -0.48 (kept)
    keep = prompt_set_mask(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]), tau=1.5)
    assert keep.tolist() == [True, True, True, True, False]
    assert prompt_set_mask(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]), tau=2.0).all()


@pytest.mark.parametrize(
    "scores",
    [torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 9.0])],
)
def test_prompt_set_filter_keeps_everything_when_its_statistics_degenerate(scores):
    # equal scores (MAD 0), too few sets, or MAD 0 with one outlier: nothing to standardise by
    assert prompt_set_mask(scores, tau=0.1).all()


def test_class_graph_is_a_row_softmax_of_scaled_cosines():
    graph = class_graph(torch.stack([E1, 3 * E2]), alpha=4.0)
    high, low = math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)
    close(graph, [[high, low], [low, high]])


def test_smoothed_teacher_mixes_log_probabilities_over_the_graph():
    logits = torch.log(torch.tensor([[0.8, 0.2]]))
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # (1 - 0.5) log q + 0.5 (log q) W, W swapping the classes: both entries 0.5 log 0.16 = log 0.4
    expected = 0.5 * torch.log(torch.tensor([0.8, 0.2])) + 0.5 * torch.log(torch.tensor([0.2, 0.8]))
    close(smoothed_teacher(logits, swap, gamma=0.5), expected.unsqueeze(0))
    close(smoothed_teacher(logits, swap, gamma=0.0), torch.log(torch.tensor([[0.8, 0.2]])))


def test_gad_with_gamma_zero_is_kdsp():
    student, teacher = torch.tensor([[0.3, -0.2, 1.0]]), torch.tensor([[1.0, 0.0, -1.0]])
    graph = torch.full((3, 3), 1 / 3)
    close(gad_loss(student, teacher, graph, 0.0), kl_to_teacher(student, teacher.log_softmax(-1)))


def test_gad_target_is_the_unnormalised_smoothed_teacher():
    # teacher q = (0.8, 0.2), W swaps, gamma 0.5: t = (log .16 / 2, log .16 / 2) = (log .4, log .4);
    # student uniform: sum exp(t) (t - log .5) = 2 * 0.4 * log 0.8, over 2 logits
    teacher = torch.log(torch.tensor([[0.8, 0.2]]))
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    close(gad_loss(torch.zeros(1, 2), teacher, swap, 0.5), 0.4 * math.log(0.8))


def test_top_patches_pick_the_largest_true_class_magnitudes():
    logits = torch.tensor([[[1.0, 0.0], [-3.0, 0.0], [2.0, 9.0], [0.5, 0.0]]])  # 1 image, 4 patches
    assert sorted(top_patches(logits, torch.tensor([0]), ratio=0.5)[0].tolist()) == [1, 2]
    assert top_patches(logits, torch.tensor([1]), ratio=0.1)[0].tolist() == [2]  # at least one


def test_lgd_compares_only_the_true_class_channel():
    # one patch, gamma 0: student log p_y = log 0.5, teacher log q_y = log 0.9;
    # KL term exp(t)(t - s) = 0.9 (log 0.9 - log 0.5), over 1 patch
    student = torch.zeros(1, 1, 2)
    teacher = torch.log(torch.tensor([[[0.9, 0.1]]]))
    graph = torch.eye(2)
    close(lgd_loss(student, teacher, graph, torch.tensor([0]), 0.0), 0.9 * math.log(0.9 / 0.5))
    close(lgd_loss(student, teacher, graph, torch.tensor([1]), 0.0), 0.1 * math.log(0.1 / 0.5))


def test_patch_tokens_of_the_joint_dimension_are_only_normalised(miniature_backbone):
    tokens = torch.full((1, 2, miniature_backbone.embed_dim), 2.0)
    close(joint_space_patches(miniature_backbone, tokens).norm(dim=-1), [[1.0, 1.0]])
    trunk = torch.randn(1, 3, miniature_backbone.model.visual.trunk.num_features)
    projected = miniature_backbone.model.visual.head(trunk)
    close(
        joint_space_patches(miniature_backbone, trunk),
        projected / projected.norm(dim=-1, keepdim=True),
    )
    with pytest.raises(ValueError, match="channels"):
        joint_space_patches(miniature_backbone, torch.randn(1, 2, 5))


def test_knowledge_guidance_is_one_minus_the_mean_cosine():
    close(knowledge_guidance_loss(torch.stack([E1, E2]), torch.stack([E1, E2])), 0.0)
    close(knowledge_guidance_loss(torch.stack([E1, E2]), torch.stack([E2, E2])), 0.5)


def test_prograd_distillation_is_t_squared_cross_entropy():
    # T = 2: teacher softmax(0, 0) = (.5, .5); student softmax((2, 0) / 2) = (e/(e+1), 1/(e+1))
    student, teacher = torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2)
    log_p = torch.log(torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)]))
    close(distillation_loss(student, teacher, 2.0), -4 * 0.5 * log_p.sum())


def test_prograd_projection_removes_only_the_conflicting_part():
    # g = (1, 0), G = (-1, 1): g . G/|G| = -1/sqrt 2 < 0 -> g - (-1/sqrt 2)(-1, 1)/sqrt 2 = (.5, .5)
    close(project_gradient(E1, torch.tensor([-1.0, 1.0]), 1.0), [0.5, 0.5])
    close(project_gradient(E1, torch.tensor([1.0, 1.0]), 1.0), E1)  # no conflict: unchanged
    close(project_gradient(E1, torch.zeros(2), 1.0), E1)


def test_routing_averages_the_lowest_entropy_prompts():
    # per image three prompts; entropies: prompt 0 uniform (high), 1 and 2 confident
    logits = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 6.0]]])
    routed, kept = low_entropy_mean(logits, ratio=0.5)  # k = int(3 * 0.5) = 1: prompt 2
    close(routed, [[0.0, 6.0]])
    assert kept.shape == (1, 1, 2)
    routed, _ = low_entropy_mean(logits, ratio=0.7)  # k = 2: prompts 2 and 1
    close(routed, [[2.0, 3.0]])


def test_marginal_entropy_is_the_entropy_of_the_mean_prediction():
    # two confident, opposite prompts average to (.5, .5): entropy log 2
    logits = torch.tensor([[[20.0, -20.0], [-20.0, 20.0]]])
    close(marginal_entropy(logits), [math.log(2)])
    close(marginal_entropy(torch.tensor([[[20.0, -20.0]]])), [0.0])


def test_vmf_fit_uses_the_mean_resultant_length():
    # e1, e2 in D = 2: mean (.5, .5), r = 1/sqrt 2, kappa = r (2 - 1/2) / (1 - 1/2) = 3/sqrt 2
    direction, kappa = fit_vmf(torch.stack([E1, E2]))
    close(direction, [1 / math.sqrt(2), 1 / math.sqrt(2)])
    close(kappa, 3 / math.sqrt(2))
    assert torch.isfinite(fit_vmf(E1.unsqueeze(0))[1])


def test_fused_vmf_adds_natural_parameters():
    direction, kappa = fuse_vmf(torch.stack([E1, E2]), torch.tensor([1.0, 1.0]))
    close(direction, [1 / math.sqrt(2), 1 / math.sqrt(2)])
    close(kappa, math.sqrt(2))


def test_anchor_loss_weights_cosine_distance_by_concentration():
    # distances (0, 1) with kappa (1, 3) -> weights (.5, 1.5): mean(0, 1.5) = .75
    close(anchor_loss(torch.stack([E1, E1]), torch.stack([E1, E2]), torch.tensor([1.0, 3.0])), 0.75)


def test_spherical_contrastive_loss_averages_both_directions():
    images, classes, labels = torch.stack([E1, E2]), torch.stack([E1, E2]), torch.tensor([0, 1])
    # similarities / T = identity / 0.5: each row and column is (2, 0) with its positive at 2
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    close(spherical_contrastive_loss(images, classes, labels, 0.5), expected)
    # a class absent from the batch adds nothing to the class-to-image direction
    # image rows / T: (2, 0, -2) and (0, 2, 0); classes 0 and 1 see images (2, 0) and (0, 2)
    value = spherical_contrastive_loss(images, torch.stack([E1, E2, -E1]), labels, 0.5)
    first = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    second = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert value.item() == pytest.approx(0.5 * ((first + second) / 2 + expected), rel=1e-5)


def test_symmetric_cross_entropy_adds_clipped_reverse_ce():
    # uniform prediction, label 0: CE = log 2, RCE = -A (1 - p_y) = 4 * 0.5
    close(symmetric_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), 1.0, 1.0), math.log(2) + 2)
    close(symmetric_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), 0.5, 0.0), math.log(2) / 2)


def test_temperature_anneals_along_a_cosine():
    assert annealed_temperature(0, 0.1, 0.01, 100) == pytest.approx(0.1)
    assert annealed_temperature(50, 0.1, 0.01, 100) == pytest.approx(0.055)
    assert annealed_temperature(500, 0.1, 0.01, 100) == pytest.approx(0.01)
