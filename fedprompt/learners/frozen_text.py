"""Features of fixed sentences (prompt templates, class descriptions) from the frozen text tower.

They never change during training, so each sentence passes the text tower once per process and
backbone; sites rebuild their learner every round and find them here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone

_CACHE: weakref.WeakKeyDictionary[Backbone, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@torch.no_grad()
def encode_sentences(
    backbone: Backbone, sentences: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """L2-normalised float32 features (N, D) of ``sentences``, memoised per backbone and sentence.

    For BERT text towers the tokens are cut after the longest sentence of each batch: padding is
    masked out of BERT's attention and pooler, so the features are unchanged and BiomedCLIP's
    256-token context costs only what the sentences use.
    """
    with _LOCK:
        known = _CACHE.setdefault(backbone, {})
        todo = list(dict.fromkeys(s for s in sentences if s not in known))
    encoded: dict[str, torch.Tensor] = {}
    for begin in range(0, len(todo), batch_size):
        chunk = todo[begin : begin + batch_size]
        tokens = backbone.tokenizer(chunk)
        if backbone.text_kind == "hf_bert":
            pad_id = int(backbone.model.text.config.pad_token_id)
            positions = torch.arange(1, tokens.shape[1] + 1)
            tokens = tokens[:, : int(((tokens != pad_id) * positions).max())]
        encoded.update(zip(chunk, backbone.encode_text(tokens), strict=True))
    with _LOCK:
        known.update(encoded)
        return torch.stack([known[s] for s in sentences]) if sentences else torch.empty(0)


def ensemble_features(
    backbone: Backbone, sentences_per_class: Sequence[Sequence[str]]
) -> torch.Tensor:
    """One L2-normalised feature per class (C, D): the mean of its sentences' features.

    This is CLIP's prompt ensembling (Radford et al., ICML 2021), used for zero-shot classifiers
    and for the mean-description targets of BiomedCoOp's SCCM.
    """
    flat = [s for sentences in sentences_per_class for s in sentences]
    features = encode_sentences(backbone, flat)
    means, begin = [], 0
    for sentences in sentences_per_class:
        means.append(features[begin : begin + len(sentences)].mean(dim=0))
        begin += len(sentences)
    return F.normalize(torch.stack(means), dim=-1)


def check_templates(templates: Sequence[str]) -> None:
    """Raises ValueError unless there is at least one template and each has a ``{}`` slot."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be non-empty and each hold '{{}}', got {templates}")


def template_features(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Hand-written prompt features (C, D): each template filled with each class name, averaged.

    Raises:
        ValueError: No template, or a template without ``{}``.
    """
    check_templates(templates)
    return ensemble_features(backbone, [[t.format(name) for t in templates] for name in classnames])


def description_bank(
    backbone: Backbone, classnames: Sequence[str], descriptions: Mapping[str, Sequence[str]]
) -> torch.Tensor:
    """Per-class description features stacked into a bank (C, P, D), P the largest count.

    A class with fewer than P sentences repeats its own from the start, so that description ``i``
    of every class forms one complete prompt set, as BiomedCoOp's teacher needs.
    """
    counts = [len(descriptions[name]) for name in classnames]
    size = max(counts)
    rows = [
        encode_sentences(backbone, [descriptions[name][i % n] for i in range(size)])
        for name, n in zip(classnames, counts, strict=True)
    ]
    return torch.stack(rows)
