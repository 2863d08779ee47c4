"""Many contexts at once: one text-tower forward for G groups of per-class prompts (G x C rows).

CoCoOp conditions the context on each image and BioVLM keeps a bank of contexts, so both need the
class prompts under several contexts. Stacking them into one batch of G x C trimmed prompts costs
one text-tower call instead of G.
"""

from __future__ import annotations

import torch

from fedprompt.text import PromptTextEncoder


class GroupedPromptEncoder(PromptTextEncoder):
    """A ``PromptTextEncoder`` that also encodes a context per group: ``(G, C, n_ctx, width)``.

    Takes the same arguments as ``PromptTextEncoder``.
    """

    def encode_groups(self, ctx: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features (G, C, D) of the class prompts under each group's context.

        Args:
            ctx: One context per group (G, n_ctx, width), shared by the classes, or one per group
                and class (G, C, n_ctx, width).
        """
        if ctx.dim() == 3:
            ctx = ctx.unsqueeze(1).expand(-1, self.num_classes, -1, -1)
        groups = ctx.shape[0]
        if tuple(ctx.shape[1:]) != (self.num_classes, self.n_ctx, self.width):
            raise ValueError(
                f"ctx must have shape (G, {self.n_ctx}, {self.width}) or "
                f"(G, {self.num_classes}, {self.n_ctx}, {self.width}), got {tuple(ctx.shape)}"
            )
        prefix = self.prefix.repeat(groups, 1, 1)
        suffix = self.suffix.repeat(groups, 1, 1)
        flat_ctx = ctx.reshape(groups * self.num_classes, self.n_ctx, self.width)
        x = torch.cat([prefix, flat_ctx.to(prefix.dtype), suffix], dim=1)
        tokens = self.tokens.repeat(groups, 1)
        with self.tower_mode():
            if self.backbone.text_kind == "hf_bert":
                features = self._tower_hf(x, self.attention_mask.repeat(groups, 1))
            else:
                features = self._tower_native(x, tokens)
        return features.reshape(groups, self.num_classes, -1)

    def _tower_hf(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text = self.backbone.model.text
        out = text.transformer(inputs_embeds=x, attention_mask=attention_mask)
        return text.proj(text.pooler(out, attention_mask))

    def _tower_native(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        model = self.backbone.model
        length = x.shape[1]
        x = x + model.positional_embedding[:length].to(x.dtype)
        attn_mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        x = model.ln_final(model.transformer(x, attn_mask=attn_mask))
        rows = torch.arange(x.shape[0], device=x.device)
        pool_type = model.text_pool_type
        if pool_type == "argmax":
            x = x[rows, tokens.argmax(dim=-1)]
        elif pool_type == "eos":
            x = x[rows, (tokens == model.text_eos_id).int().argmax(dim=-1)]
        elif pool_type == "first":
            x = x[:, 0]
        elif pool_type == "last":
            x = x[:, -1]
        projection = model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
