"""CoCoOp (Zhou et al., CVPR 2022): a context conditioned on each image through a meta-network."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner
from fedprompt.learners.prompt_groups import GroupedPromptEncoder
from fedprompt.learners.registry import register_learner


@register_learner("cocoop")
class CoCoOp(Learner):
    """Context ``ctx + pi(x)`` for image ``x``, with ``pi`` a small meta-network (the paper's).

    The meta-network is Linear(D, D/16) -> ReLU -> Linear(D/16, width), D the joint dimension and
    width the token-embedding size; its output shifts every context vector. The class prompts are
    therefore different for each image: one text-tower forward encodes all B x C trimmed prompts
    of a batch. Both the context and the meta-network are trained and communicated.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        n_ctx: Number of context vectors.
        ctx_init: Words whose embeddings initialise the context (``n_ctx`` tokens), else random.
        trim_padding: Run the text tower without the prompts' common trailing padding.
        text_dropout: The authors' quirk: the text tower's dropout active on the prompt path
            while training, as in their train-mode trainers; off by default, never in eval.
        images_per_pass: Images whose B x C prompts share one text-tower call; bounds memory.
    """

    text_feature_only = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        trim_padding: bool = True,
        text_dropout: bool = False,
        images_per_pass: int = 64,
    ) -> None:
        super().__init__(backbone, classnames)
        if images_per_pass < 1:
            raise ValueError(f"images_per_pass must be at least 1, got {images_per_pass}")
        self.images_per_pass = images_per_pass
        self.prompt_encoder = GroupedPromptEncoder(
            backbone,
            self.classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            trim=trim_padding,
            text_dropout=text_dropout,
        )
        self.ctx = torch.nn.Parameter(self.prompt_encoder.init_context())
        dim, width = backbone.embed_dim, self.prompt_encoder.width
        hidden = max(1, dim // 16)
        self.meta_net = torch.nn.Sequential(
            OrderedDict(
                [
                    ("linear1", torch.nn.Linear(dim, hidden)),
                    ("relu", torch.nn.ReLU()),
                    ("linear2", torch.nn.Linear(hidden, width)),
                ]
            )
        ).to(backbone.device)

    def text_features(self) -> torch.Tensor:
        """Class features (C, D) of the bare context, without any image's shift."""
        return F.normalize(self.prompt_encoder.encode(self.ctx).float(), dim=-1)

    def conditional_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """L2-normalised class features (B, C, D) of each image's own prompts."""
        shift = self.meta_net(image_features.to(self.ctx.device, torch.float32))
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1).to(self.ctx.dtype)
        return F.normalize(self.prompt_encoder.encode_groups(ctx).float(), dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of each image against its own class prompts."""
        logits = []
        for begin in range(0, len(image_features), self.images_per_pass):
            images = image_features[begin : begin + self.images_per_pass].to(self.ctx.device)
            text = self.conditional_text_features(images)
            logits.append(self._logit_scale * torch.einsum("bd,bcd->bc", images.float(), text))
        if not logits:
            return image_features.new_zeros(0, self.num_classes)
        return torch.cat(logits)
