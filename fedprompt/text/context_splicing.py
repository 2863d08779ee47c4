"""Splices learnable context vectors into the token embeddings of a frozen CLIP text tower."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from fedprompt.backbones import Backbone

_PLACEHOLDER_WORD = "X"
# Pooling modes of open_clip's native text tower that read a position at or before the EOT token;
# only with these (and a causal mask) is trimming trailing padding exact.
_TRIMMABLE_POOLS = ("argmax", "eos", "first")


class PromptTextEncoder:
    """Encodes ``[SOS/CLS] ctx_1..ctx_n <class words><suffix> [EOT/SEP] pad..`` for every class.

    The prompts are tokenized once; the frozen token embeddings before the context (prefix) and
    after it (suffix) are kept as plain tensors on the backbone's device, so ``encode`` costs one
    text-tower forward for all classes and gradients reach only the context.

    Args:
        backbone: The frozen backbone (either text-tower kind).
        classnames: One name per class, in label order.
        n_ctx: Number of context vectors.
        ctx_init: Words whose token embeddings initialise the context; used only when they are
            exactly ``n_ctx`` tokens, otherwise the context starts random (std 0.02).
        class_template: What follows the context, ``{}`` being the class name.
        trim: Drop the trailing padding shared by all prompts. Exact (same features) and much
            faster, as BiomedCLIP pads to 256 tokens; ignored where it would not be exact.
        text_dropout: Run the text tower in train mode (its dropout active) while ``training``
            is set, as the authors' trainers do: they put their whole model in train mode, so
            BERT's dropout acts on the learned-prompt path. Off by default: the frozen tower stays
            deterministic, and in eval the features are always dropout-free.

    Attributes:
        training: Set by the owning learner's ``train()``/``eval()``; only with ``text_dropout``
            does it change the forward.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_template: str = "{}.",
        trim: bool = True,
        text_dropout: bool = False,
    ) -> None:
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        if len(classnames) == 0:
            raise ValueError("classnames is empty")
        self.backbone = backbone
        self.classnames = tuple(classnames)
        self.n_ctx = n_ctx
        self.text_dropout = text_dropout
        self.training = False
        model = backbone.model
        self.pad_id = int(model.text.config.pad_token_id) if backbone.text_kind == "hf_bert" else 0

        init_ids = self._inner_ids(ctx_init) if ctx_init else []
        self.init_from_words = len(init_ids) == n_ctx
        ctx_words = ctx_init if self.init_from_words else " ".join([_PLACEHOLDER_WORD] * n_ctx)
        self.prompts = [f"{ctx_words} {class_template.format(name)}" for name in self.classnames]
        tokens = backbone.tokenizer(self.prompts).to(backbone.device)
        ctx_ids = torch.tensor(self._inner_ids(ctx_words), device=tokens.device)
        if len(ctx_ids) != n_ctx or not bool((tokens[:, 1 : 1 + n_ctx] == ctx_ids).all()):
            raise ValueError(
                f"the tokenizer does not place {n_ctx} context tokens right after the start token "
                f"in prompts such as {self.prompts[0]!r}"
            )
        self.padded_length = tokens.shape[1]
        self.trimmed = trim and self._trim_is_exact()
        if self.trimmed:
            tokens = tokens[:, : self._used_length(tokens)]
        self.tokens = tokens
        self.attention_mask = (tokens != self.pad_id).long()
        with torch.no_grad():
            embeddings = self._token_embeddings(tokens)
        self.prefix = embeddings[:, :1]
        self.suffix = embeddings[:, 1 + n_ctx :]
        self._init_embeddings = embeddings[0, 1 : 1 + n_ctx].clone()
        self.width = embeddings.shape[-1]

    @property
    def num_classes(self) -> int:
        """Number of classes (rows of ``encode``'s output)."""
        return len(self.classnames)

    @property
    def sequence_length(self) -> int:
        """Tokens per prompt in the text-tower forward (after trimming, if enabled)."""
        return self.tokens.shape[1]

    def init_context(
        self, class_specific: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Initial context: ``ctx_init``'s token embeddings, else N(0, 0.02²) (CoOp's choice).

        Args:
            class_specific: Return one context per class, (C, n_ctx, width), instead of a shared
                (n_ctx, width) one; word initialisations are repeated, random ones drawn per class.
            generator: Random generator for the random initialisation.
        """
        shape = (self.num_classes, self.n_ctx) if class_specific else (self.n_ctx,)
        if self.init_from_words:
            ctx = self._init_embeddings.expand(*shape, self.width)
            return ctx.detach().clone()
        ctx = torch.empty(*shape, self.width, dtype=self.prefix.dtype, device=self.prefix.device)
        return ctx.normal_(0.0, 0.02, generator=generator)

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features (C, D) of the prompts with ``ctx`` spliced in.

        Args:
            ctx: Shared context (n_ctx, width) or class-specific context (C, n_ctx, width).
        """
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        if tuple(ctx.shape) != (self.num_classes, self.n_ctx, self.width):
            raise ValueError(
                f"ctx must have shape ({self.n_ctx}, {self.width}) or "
                f"({self.num_classes}, {self.n_ctx}, {self.width}), got {tuple(ctx.shape)}"
            )
        x = torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)
        with self.tower_mode():
            if self.backbone.text_kind == "hf_bert":
                return self._encode_hf(x)
            return self._encode_native(x)

    @contextlib.contextmanager
    def tower_mode(self) -> Iterator[None]:
        """Text tower in train mode during a forward if ``text_dropout`` and ``training`` are set.

        It goes back to eval mode afterwards: the frozen backbone is shared by every site.
        """
        if not (self.text_dropout and self.training):
            yield
            return
        model = self.backbone.model
        tower = model.text if self.backbone.text_kind == "hf_bert" else model.transformer
        tower.train()
        try:
            yield
        finally:
            tower.eval()

    def _inner_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end tokens and padding."""
        tokens = self.backbone.tokenizer([text])
        length = self._used_length(tokens)
        return tokens[0, 1 : length - 1].tolist()

    def _used_length(self, tokens: torch.Tensor) -> int:
        """Length up to the last non-padding token of the longest prompt."""
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        return int(((tokens != self.pad_id) * positions).max())

    def _trim_is_exact(self) -> bool:
        if self.backbone.text_kind == "hf_bert":
            return True  # padding is masked out of BERT's attention and of the pooler
        model = self.backbone.model
        return model.attn_mask is not None and model.text_pool_type in _TRIMMABLE_POOLS

    def _token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.backbone.model
        if self.backbone.text_kind == "hf_bert":
            # Word embeddings only: BERT adds position/type embeddings and LayerNorm itself.
            return model.text.transformer.get_input_embeddings()(tokens)
        return model.token_embedding(tokens).to(model.transformer.get_cast_dtype())

    def _encode_hf(self, x: torch.Tensor) -> torch.Tensor:
        text = self.backbone.model.text
        out = text.transformer(inputs_embeds=x, attention_mask=self.attention_mask)
        return text.proj(text.pooler(out, self.attention_mask))

    def _encode_native(self, x: torch.Tensor) -> torch.Tensor:
        model = self.backbone.model
        length = x.shape[1]
        x = x + model.positional_embedding[:length].to(x.dtype)
        attn_mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        x = model.transformer(x, attn_mask=attn_mask)
        x = model.ln_final(x)
        x = self._pool_native(x)
        projection = model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection

    def _pool_native(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's ``text_global_pool`` on the (unchanged) token ids of the prompts."""
        pool_type = self.backbone.model.text_pool_type
        rows = torch.arange(x.shape[0], device=x.device)
        if pool_type == "argmax":  # the EOT token has the highest id
            return x[rows, self.tokens.argmax(dim=-1)]
        if pool_type == "eos":
            eos_id = self.backbone.model.text_eos_id
            return x[rows, (self.tokens == eos_id).int().argmax(dim=-1)]
        if pool_type == "first":
            return x[:, 0]
        if pool_type == "last":
            return x[:, -1]
        return x
