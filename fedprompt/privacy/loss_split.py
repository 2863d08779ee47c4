"""Which loss terms touch private records (clipped and noised) and which do not (left exact).

DP-SGD bounds the influence of one record by clipping that record's gradient; a term computed
from public data only (for example BiomedCoOp's SCCM, which pulls class text features toward
embeddings of public LLM class descriptions) has no record to protect, so its gradient is added
after the noise, unclipped: post-processing of the private gradient with public data.

A learner states its split by duck typing; every method is optional:

- ``public_loss() -> Tensor | None``: the sum of the terms that use no private record. Absent or
  returning ``None``: every term is private.
- ``private_sample_losses(similarities, labels, image_features, **extras) -> Tensor (B,)``: the
  private terms per record in text-feature mode, as a function of ``similarities = image_features
  @ T.T`` (B, C) (they may read ``image_features`` and ``extras`` as constants, never ``T`` any
  other way). Absent: cross-entropy of ``logit_scale * similarities``, which is ``Learner.loss``;
  so a learner that overrides ``loss`` without defining this method trains in exact mode, where
  its whole ``loss`` is clipped per record, never silently without its extra terms.
- ``private_loss(image_features, labels, **extras) -> Tensor``: the batch mean of the private
  terms, for exact mode (called on one record at a time). Absent: ``loss``, which is then
  required to be all private (no ``public_loss``).

The flags ``text_feature_only`` and ``per_sample_loss`` on the learner class say whether the
private terms reach the trainable tensors only through the class text features ``T`` and whether
they are a mean of per-record terms (see ``fedprompt.learners.base.Learner``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from fedprompt.learners import Learner

ClippingMode = Literal["text_features", "exact"]
CLIPPING_MODES: tuple[str, ...] = ("auto", "text_features", "exact")


def public_loss(learner: Learner) -> torch.Tensor | None:
    """The learner's public (no private record) loss terms, or ``None`` where it has none."""
    compute = getattr(learner, "public_loss", None)
    return compute() if compute is not None else None


def has_public_loss(learner: Learner) -> bool:
    """Whether the learner declares public loss terms at all."""
    return getattr(learner, "public_loss", None) is not None


def private_sample_losses(
    learner: Learner,
    similarities: torch.Tensor,
    labels: torch.Tensor,
    image_features: torch.Tensor,
    extras: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per-record private losses (B,) from the cosine similarities (B, C) to the class features.

    Defaults to cross-entropy of ``logit_scale * similarities``, the loss of ``Learner.loss``.
    """
    compute = getattr(learner, "private_sample_losses", None)
    if compute is not None:
        return compute(similarities, labels, image_features, **extras)
    logits = learner.backbone.logit_scale() * similarities
    return F.cross_entropy(logits, labels, reduction="none")


def private_loss(
    learner: Learner,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    extras: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The batch mean of the private loss terms (exact mode calls it on one record at a time).

    Raises:
        ValueError: The learner has public terms but no ``private_loss`` to leave them out.
    """
    compute = getattr(learner, "private_loss", None)
    if compute is not None:
        return compute(image_features, labels, **extras)
    if has_public_loss(learner):
        raise ValueError(
            f"{type(learner).__name__} declares public_loss() but no private_loss(); exact DP "
            "clipping needs the private terms alone."
        )
    return learner.loss(image_features, labels, **extras)


def resolve_clipping(learner: Learner, clipping: str) -> ClippingMode:
    """The clipping mode for this learner: ``auto`` picks text-feature space where it is valid.

    Text-feature space needs ``text_feature_only`` and private terms known as a function of the
    similarities (``has_text_feature_losses``); exact mode needs only per-record terms, or a
    batch-coupled loss that the learner says may be taken one record at a time
    (``record_loss_note``).

    Raises:
        ValueError: An unknown mode; a loss that is not a mean of per-record terms (no
            per-record gradient exists to clip); or text-feature mode for a learner whose
            private loss reaches its tensors other than through the class text features, or
            whose private terms are not known as a function of the similarities.
    """
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"Unknown privacy.clipping {clipping!r}; use one of {CLIPPING_MODES}.")
    name = type(learner).__name__
    if not learner.per_sample_loss:
        if not learner.record_loss_note:
            raise ValueError(
                f"{name}'s loss is not a mean of per-record terms, so DP-SGD cannot bound one "
                "record's influence by clipping; it cannot train with privacy=dpsgd."
            )
        if clipping == "text_features":
            raise ValueError(
                f"{name}'s loss couples the records of a batch; under DP it is taken one record "
                "at a time, which needs privacy.clipping=exact (or auto)."
            )
        return "exact"
    text_feature_only = learner.text_feature_only
    terms_known = has_text_feature_losses(learner)
    if clipping == "auto":
        return "text_features" if text_feature_only and terms_known else "exact"
    if clipping == "text_features" and not text_feature_only:
        raise ValueError(
            f"{name}'s loss reaches its prompt other than through the class text features "
            "(e.g. image-conditioned prompts); set privacy.clipping=exact."
        )
    if clipping == "text_features" and not terms_known:
        raise ValueError(
            f"{name} overrides loss() but defines no private_sample_losses(), so text-feature "
            "clipping would drop its extra terms; define it (and public_loss()) or set "
            "privacy.clipping=exact."
        )
    return "text_features" if clipping == "text_features" else "exact"


def has_text_feature_losses(learner: Learner) -> bool:
    """Whether the private terms are known as a function of the similarities.

    True where the learner defines ``private_sample_losses``, or keeps ``Learner.loss`` (plain
    cross-entropy, the default of ``private_sample_losses``).
    """
    if getattr(learner, "private_sample_losses", None) is not None:
        return True
    return type(learner).loss is Learner.loss
