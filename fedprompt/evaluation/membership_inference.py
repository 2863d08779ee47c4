"""Loss-threshold membership inference against a site's prompt: the attack's ROC AUC.

The attack (Yeom et al., CSF 2018) guesses "member" when a record's loss under the shared prompt
is low. Its AUC over a site's training records (members) and as many held-out records of the
same distribution (non-members) measures how much the prompt reveals about who was trained on:
0.5 is chance. It runs at the site, on per-record losses that never leave it; only the scalar
AUC does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedprompt.learners import Learner


@dataclass(frozen=True)
class MembershipInferenceResult:
    """The attack's AUC on equal numbers of members and non-members."""

    auc: float
    num_members: int
    num_nonmembers: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON and Flower metric records."""
        return asdict(self)


def rank_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half.

    The Mann-Whitney U statistic over the product of the two sample sizes, from average ranks
    of the pooled scores (Hanley and McNeil, Radiology 1982).

    Raises:
        ValueError: Either set is empty.
    """
    positive = np.asarray(positive_scores, dtype=np.float64).ravel()
    negative = np.asarray(negative_scores, dtype=np.float64).ravel()
    if positive.size == 0 or negative.size == 0:
        raise ValueError("The AUC needs at least one positive and one negative score.")
    pooled = np.concatenate([positive, negative])
    order = np.argsort(pooled, kind="mergesort")
    sorted_scores = pooled[order]
    ranks = np.empty(pooled.size, dtype=np.float64)
    # Average rank (1-based) of each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], pooled.size]
    for begin, end in zip(starts, ends, strict=True):
        ranks[order[begin:end]] = (begin + end + 1) / 2.0
    u_statistic = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2.0
    return float(u_statistic / (positive.size * negative.size))


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the attack that calls a record a member when its loss is below a threshold."""
    return rank_auc(-np.asarray(member_losses), -np.asarray(nonmember_losses))


@torch.no_grad()
def per_example_losses(
    learner: Learner, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> np.ndarray:
    """Cross-entropy of each record under the learner's current prompt (what the attacker sees)."""
    learner.eval()
    device = learner.backbone.device
    losses = [
        F.cross_entropy(
            learner(features[begin : begin + batch_size].to(device)),
            labels[begin : begin + batch_size].to(device),
            reduction="none",
        ).cpu()
        for begin in range(0, len(labels), batch_size)
    ]
    return torch.cat(losses).double().numpy() if losses else np.empty(0)


def membership_inference_auc(
    learner: Learner,
    member_features: torch.Tensor,
    member_labels: torch.Tensor,
    nonmember_features: torch.Tensor,
    nonmember_labels: torch.Tensor,
    seed: int = 0,
) -> MembershipInferenceResult:
    """Loss-threshold attack AUC on a site's members vs held-out non-members, equal counts.

    The larger set is subsampled (seeded) to the size of the smaller: the usual balanced set-up,
    in which an AUC of 0.5 is chance and the attacker has no prior for membership.

    Args:
        learner: The learner holding the shared prompt under attack.
        member_features: Frozen features of records the prompt was trained on (N, D).
        member_labels: Their labels (N,).
        nonmember_features: Features of held-out records of the same distribution (M, D).
        nonmember_labels: Their labels (M,).
        seed: Seed of the subsampling.

    Raises:
        ValueError: Either set is empty.
    """
    count = min(len(member_labels), len(nonmember_labels))
    if count == 0:
        raise ValueError("Membership inference needs members and non-members; one set is empty.")
    rng = np.random.default_rng(seed)
    members = torch.as_tensor(np.sort(rng.choice(len(member_labels), count, replace=False)))
    nonmembers = torch.as_tensor(np.sort(rng.choice(len(nonmember_labels), count, replace=False)))
    member_losses = per_example_losses(learner, member_features[members], member_labels[members])
    nonmember_losses = per_example_losses(
        learner, nonmember_features[nonmembers], nonmember_labels[nonmembers]
    )
    return MembershipInferenceResult(
        auc=loss_threshold_auc(member_losses, nonmember_losses),
        num_members=count,
        num_nonmembers=count,
    )
