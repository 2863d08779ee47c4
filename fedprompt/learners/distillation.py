"""Losses shared by the description-guided methods: BiomedCoOp's SCCM and KDSP, OGKD's GAD and LGD.

Formulas follow the papers and the authors' released code, whose published numbers they produced:
BiomedCoOp (Koleilat et al., CVPR 2025) and OGKD ("Geometry-Aware Distillation for Prompt Tuning
Biomedical Vision-Language Models", 2026).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.frozen_text import description_bank, ensemble_features


def sccm_loss(text_features: torch.Tensor, description_means: torch.Tensor) -> torch.Tensor:
    """BiomedCoOp's semantic consistency (SCCM): mean squared error to the description means.

    Args:
        text_features: Learned, L2-normalised class features (C, D).
        description_means: L2-normalised mean description feature of each class (C, D).
    """
    return F.mse_loss(text_features, description_means.to(text_features))


def kl_to_teacher(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) summed, divided by the number of logits (BiomedCoOp's KDSP scale).

    Args:
        student_logits: Logits (..., C) that receive the gradient.
        teacher_log_probs: Log-probabilities of the teacher (..., C), or any log-target (OGKD's
            smoothed teacher is not normalised).
    """
    log_p = F.log_softmax(student_logits, dim=-1)
    target = teacher_log_probs.detach().to(log_p)
    return F.kl_div(log_p, target, reduction="sum", log_target=True) / log_p.numel()


def prompt_set_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """BiomedCoOp's z-score filter over description prompt sets: which sets the teacher keeps.

    Sets whose score lies more than ``tau`` standard deviations from the mean score are dropped.
    The released code (and the paper's "median/MAD" wording) first standardises the scores with
    the median and the median absolute deviation, then standardises the result again with its
    mean and standard deviation; the second, affine step cancels the first, so what filters is
    the plain z-score. The two steps are kept here to match the released code's degenerate
    cases: fewer than three sets, or zero MAD or spread, keep every set, as does a filter that
    would keep none.

    Args:
        scores: One score per prompt set (P,).
        tau: Threshold on the standardised score.
    """
    keep_all = torch.ones_like(scores, dtype=torch.bool)
    if scores.numel() < 3:
        return keep_all
    # Written without data-dependent branches, so that it also runs under torch.func.vmap
    # (exact DP-SGD evaluates the filter one record at a time).
    median = scores.median()
    mad = (scores - median).abs().median()
    z = (scores - median) / torch.where(mad > 0, mad, torch.ones_like(mad))
    spread = z.std()
    usable = (mad > 0) & torch.isfinite(spread) & (spread > 0)
    standardised = (z - z.mean()) / torch.where(usable, spread, torch.ones_like(spread))
    keep = (standardised.abs() <= tau) & usable
    return torch.where(keep.any(), keep, keep_all)


def class_graph(prototypes: torch.Tensor, alpha: float) -> torch.Tensor:
    """OGKD's row-stochastic class-similarity graph W = softmax_j(alpha * cos(p_i, p_j)) (C, C)."""
    unit = F.normalize(prototypes.float(), dim=-1)
    return torch.softmax(alpha * unit @ unit.t(), dim=-1)


def smoothed_teacher(
    teacher_logits: torch.Tensor, graph: torch.Tensor, gamma: float
) -> torch.Tensor:
    """OGKD's geometry-aware target: (1 - gamma) log q + gamma (log q) W, q the teacher softmax.

    ``gamma = 0`` gives the plain teacher (BiomedCoOp's KDSP).
    """
    log_q = F.log_softmax(teacher_logits.detach(), dim=-1)
    return (1.0 - gamma) * log_q + gamma * log_q @ graph.to(log_q)


def gad_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, graph: torch.Tensor, gamma: float
) -> torch.Tensor:
    """OGKD's global geometry-aware distillation (GAD) on the pooled image features (B, C)."""
    return kl_to_teacher(student_logits, smoothed_teacher(teacher_logits, graph, gamma))


def top_patches(
    patch_teacher_logits: torch.Tensor, labels: torch.Tensor, ratio: float
) -> torch.Tensor:
    """Indices (B, K) of OGKD's attentive patches: the largest |teacher logit| of the true class.

    ``K = max(1, round(P * ratio))`` of the P patches of each image.
    """
    batch, patches, _ = patch_teacher_logits.shape
    k = max(1, round(patches * ratio))
    index = labels.view(batch, 1, 1).expand(batch, patches, 1)
    true_class = patch_teacher_logits.gather(-1, index).squeeze(-1)
    return true_class.abs().topk(k, dim=1).indices


def lgd_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_logits: torch.Tensor,
    graph: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """OGKD's label-guided geometry distillation (LGD) on selected patch tokens.

    The teacher's patch distribution is smoothed over the class graph; the KL is taken on the
    true-class channel only, per patch, and divided by the number of patches.

    Args:
        student_patch_logits: Logits (B, K, C) of the selected patches under the learned prompt.
        teacher_patch_logits: Logits (B, K, C) of the same patches under the teacher.
        graph: Class graph (C, C).
        labels: True classes (B,).
        gamma: Smoothing strength.
    """
    batch, patches, _ = student_patch_logits.shape
    index = labels.view(batch, 1, 1).expand(batch, patches, 1)
    target = smoothed_teacher(teacher_patch_logits, graph, gamma).gather(-1, index).squeeze(-1)
    log_p = F.log_softmax(student_patch_logits, dim=-1).gather(-1, index).squeeze(-1)
    return F.kl_div(log_p, target.to(log_p), reduction="sum", log_target=True) / log_p.numel()


class DescriptionTeacher:
    """The frozen zero-shot teacher of BiomedCoOp and OGKD, built from class descriptions.

    Holds the description bank (C, P, D), where prompt set ``i`` is description ``i`` of every
    class, and each class's mean description feature (the SCCM target).

    Args:
        backbone: The frozen backbone.
        classnames: Class names in label order.
        descriptions: Class name -> its sentences.
        tau: Threshold of the prompt-set outlier filter.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        descriptions: Mapping[str, Sequence[str]],
        tau: float,
    ) -> None:
        self.tau = tau
        self.bank = description_bank(backbone, classnames, descriptions)
        self.means = ensemble_features(backbone, [descriptions[name] for name in classnames])

    def features(self, image_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """Teacher class features (C, D): the mean of the prompt sets the filter keeps.

        A set's score is the batch mean of its highest class logit (BiomedCoOp's rule), so the
        selection depends on the whole batch.
        """
        with torch.no_grad():
            bank = self.bank.to(image_features)
            logits = logit_scale * torch.einsum("bd,cpd->bpc", image_features, bank)
            scores = logits.max(dim=-1).values.mean(dim=0)
            keep = prompt_set_mask(scores, self.tau).to(bank)
            kept = (bank * keep[None, :, None]).sum(dim=1) / keep.sum()
            return F.normalize(kept, dim=-1)
