"""BioVLM (Singha et al., ACL Findings 2026): a prompt bank routed per image by low entropy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner
from fedprompt.learners.distillation import kl_to_teacher
from fedprompt.learners.frozen_text import description_bank, ensemble_features
from fedprompt.learners.prompt_groups import GroupedPromptEncoder
from fedprompt.learners.registry import register_learner
from fedprompt.text.descriptions import load_descriptions


def low_entropy_mean(logits: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BioVLM's routing: per image, average the logits of its most confident prompts.

    Args:
        logits: Logits (B, N, C) of each image under N prompts.
        ratio: Share of prompts kept, ``k = max(1, int(N * ratio))``, those of lowest entropy.

    Returns:
        The mean logits of the kept prompts (B, C) and the kept logits (B, k, C).
    """
    k = max(1, int(logits.shape[1] * ratio))
    with torch.no_grad():
        log_p = F.log_softmax(logits, dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
        chosen = entropy.topk(k, dim=1, largest=False).indices
    kept = logits.gather(1, chosen.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return kept.mean(dim=1), kept


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (B,) of each image's average prediction over its k prompts, logits (B, k, C).

    The average is taken on probabilities, ``log mean_j p_j``, as in test-time prompt tuning
    (Shu et al., NeurIPS 2022), whose term BioVLM reuses.
    """
    log_p = F.log_softmax(logits, dim=-1)
    mean_log_p = torch.logsumexp(log_p, dim=1) - math.log(logits.shape[1])
    return -(mean_log_p.exp() * mean_log_p).sum(dim=-1)


@register_learner("biovlm")
class BioVLM(Learner):
    """A bank of ``bank_size`` contexts shared by the classes, routed per image.

    Each image is classified with the mean logits of its ``top_ratio`` lowest-entropy prompts
    (also at test time). The loss is CE + ``entropy_weight`` * the routed prompts' marginal
    entropy + KL to an attribute teacher (the class descriptions, routed the same way) on the image
    + KL to the same teacher on the image's augmented views (the extra input ``views``) +
    ``cosine_weight`` * (1 - cosine between every bank prompt's class feature and the class's
    mean description). KL terms are summed and divided by B x bank_size x C, as the released
    code does. The released code detaches the entropy terms; here the routed prompts' entropy
    carries its gradient, as the paper's objective states (``entropy_weight: 0`` drops it).

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        bank_size: Number of contexts in the bank (10).
        n_ctx: Tokens per context (4); contexts start random, N(0, 0.02^2).
        top_ratio: Share of prompts (and of attribute sets) routed per image (0.5).
        entropy_weight: Weight of the marginal-entropy term (0.5).
        kd_weight: Weight of the attribute distillation on the image (1.0).
        view_kd_weight: Weight of the attribute distillation on its augmented views (1.0).
        cosine_weight: Weight of the prompt-attribute cosine term (0.5).
        descriptions: The class attributes: a bundled set's name or a JSON file; None picks the
            bundled set covering the classes.
        trim_padding: Run the text tower without the prompts' common trailing padding.
        paired_cosine: The released trainer's cosine term instead of ours: prompt ``p`` of the
            bank is paired with attribute ``p`` of every class (attribute ``p mod A`` here, A
            the attributes per class; the released code needs A = bank_size) and the cosine is
            taken along the class axis, per embedding coordinate (``CosineSimilarity(dim=1)``
            on (P, C, D) tensors), eps 1e-7. Off by default: ours compares each prompt's class
            feature with the class's mean attribute along the embedding, the paper's reading.
        text_dropout: The authors' quirk: the text tower's dropout active on the prompt path
            while training, as in their train-mode trainers; off by default, never in eval.
    """

    required_inputs = ("views",)
    text_feature_only = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        bank_size: int = 10,
        n_ctx: int = 4,
        top_ratio: float = 0.5,
        entropy_weight: float = 0.5,
        kd_weight: float = 1.0,
        view_kd_weight: float = 1.0,
        cosine_weight: float = 0.5,
        descriptions: str | None = None,
        trim_padding: bool = True,
        paired_cosine: bool = False,
        text_dropout: bool = False,
    ) -> None:
        super().__init__(backbone, classnames)
        if bank_size < 1 or not 0 < top_ratio <= 1:
            raise ValueError(
                f"bank_size must be at least 1 and top_ratio in (0, 1], got {bank_size} and "
                f"{top_ratio}"
            )
        self.top_ratio = top_ratio
        self.entropy_weight = entropy_weight
        self.kd_weight = kd_weight
        self.view_kd_weight = view_kd_weight
        self.cosine_weight = cosine_weight
        self.paired_cosine = paired_cosine
        self.prompt_encoder = GroupedPromptEncoder(
            backbone,
            self.classnames,
            n_ctx=n_ctx,
            ctx_init=None,
            trim=trim_padding,
            text_dropout=text_dropout,
        )
        self.ctx = torch.nn.Parameter(
            torch.stack([self.prompt_encoder.init_context() for _ in range(bank_size)])
        )
        found = load_descriptions(self.classnames, descriptions)
        self.description_source = found.source
        self.attribute_bank = description_bank(backbone, self.classnames, found)
        self.attribute_means = ensemble_features(backbone, [found[n] for n in self.classnames])

    def bank_features(self) -> torch.Tensor:
        """L2-normalised class features (bank_size, C, D) of every prompt in the bank."""
        return F.normalize(self.prompt_encoder.encode_groups(self.ctx).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        """Class features (C, D) of the bank as a whole (the mean over its prompts)."""
        return F.normalize(self.bank_features().mean(dim=0), dim=-1)

    def _bank_logits(self, image_features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return self._logit_scale * torch.einsum("bd,pcd->bpc", image_features.to(bank), bank)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C): each image's routed mean over its lowest-entropy prompts."""
        routed, _ = low_entropy_mean(
            self._bank_logits(image_features, self.bank_features()), self.top_ratio
        )
        return routed

    def _attribute_teacher(self, features: torch.Tensor) -> torch.Tensor:
        """Routed attribute-teacher log-probabilities (B, C) of features (B, N, D)."""
        bank = self.attribute_bank.to(features)
        logits = self._logit_scale * torch.einsum("bnd,cad->bnac", features, bank)
        routed, _ = low_entropy_mean(logits.flatten(1, 2), self.top_ratio)
        return F.log_softmax(routed, dim=-1)

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """CE + entropy + attribute distillation on image and views + cosine; needs ``views``."""
        self.check_extras(extras)
        bank = self.bank_features()
        images = image_features.to(bank)
        views = extras["views"].to(bank)
        if views.dim() != 3 or views.shape[0] != images.shape[0]:
            raise ValueError(f"views must have shape (B, V, D), got {tuple(views.shape)}")
        routed, kept = low_entropy_mean(self._bank_logits(images, bank), self.top_ratio)
        with torch.no_grad():
            teacher = self._attribute_teacher(images.unsqueeze(1))
            view_teacher = self._attribute_teacher(views)
        per_prompt = 1.0 / bank.shape[0]
        return (
            F.cross_entropy(routed, labels.to(routed.device))
            + self.entropy_weight * marginal_entropy(kept).mean()
            + self.kd_weight * per_prompt * kl_to_teacher(routed, teacher)
            + self.view_kd_weight * per_prompt * kl_to_teacher(routed, view_teacher)
            + self.cosine_weight * (1.0 - self.attribute_cosine(bank).mean())
        )

    def attribute_cosine(self, bank: torch.Tensor) -> torch.Tensor:
        """Cosines between the bank's class features (P, C, D) and the class attributes.

        Ours (default): (P, C), each prompt's class feature against the class's mean attribute.
        ``paired_cosine``: (P, D), the released trainer's pairing of prompt p with attribute p,
        the cosine taken along the class axis.
        """
        if not self.paired_cosine:
            return F.cosine_similarity(bank, self.attribute_means.to(bank).unsqueeze(0), dim=-1)
        attributes = self.attribute_bank.to(bank)  # (C, A, D)
        index = torch.arange(bank.shape[0], device=bank.device) % attributes.shape[1]
        paired = attributes[:, index].transpose(0, 1)  # (P, C, D)
        return F.cosine_similarity(bank, paired, dim=1, eps=1e-7)
