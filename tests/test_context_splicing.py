"""Context splicing reproduces the frozen text tower exactly and trains only the context."""

import pytest
import torch

from fedprompt.text import PromptTextEncoder

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


@pytest.fixture(params=["miniature", "miniature-native"])
def backbone(request):
    fixture = "miniature_backbone" if request.param == "miniature" else "miniature_native_backbone"
    return request.getfixturevalue(fixture)


@pytest.mark.parametrize("trim", [True, False])
def test_initial_context_reproduces_encode_text(backbone, trim):
    encoder = PromptTextEncoder(backbone, CLASSES, n_ctx=4, ctx_init="a photo of a", trim=trim)
    assert encoder.prompts == [f"a photo of a {name}." for name in CLASSES]
    with torch.no_grad():
        spliced = encoder.encode(encoder.init_context())
        reference = backbone.model.encode_text(backbone.tokenizer(encoder.prompts))
    torch.testing.assert_close(spliced, reference, atol=1e-5, rtol=0)


def test_trimming_shortens_the_sequence_without_changing_features(backbone):
    trimmed = PromptTextEncoder(backbone, CLASSES, trim=True)
    padded = PromptTextEncoder(backbone, CLASSES, trim=False)
    assert trimmed.trimmed and not padded.trimmed
    assert trimmed.sequence_length < padded.sequence_length == padded.padded_length
    longest = backbone.tokenizer(trimmed.prompts).ne(trimmed.pad_id).sum(dim=1).max()
    assert trimmed.sequence_length == int(longest)
    ctx = torch.randn(4, trimmed.width, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        torch.testing.assert_close(trimmed.encode(ctx), padded.encode(ctx), atol=1e-5, rtol=0)


def test_only_the_context_receives_gradients(backbone):
    encoder = PromptTextEncoder(backbone, CLASSES)
    ctx = encoder.init_context().requires_grad_(True)
    encoder.encode(ctx).pow(2).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())
    assert not backbone.model.training


def test_class_specific_context_gives_each_class_its_own_prompt(backbone):
    encoder = PromptTextEncoder(backbone, CLASSES)
    shared = encoder.init_context()
    per_class = encoder.init_context(class_specific=True)
    assert per_class.shape == (len(CLASSES), 4, encoder.width)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(per_class), encoder.encode(shared))
        changed = per_class.clone()
        changed[0] += 0.5
        features, before = encoder.encode(changed), encoder.encode(per_class)
    assert not torch.allclose(features[0], before[0])
    torch.testing.assert_close(features[1:], before[1:])


def test_context_length_other_than_the_init_words_starts_random(backbone):
    encoder = PromptTextEncoder(backbone, CLASSES, n_ctx=8, ctx_init="a photo of a")
    assert not encoder.init_from_words
    assert encoder.prompts[0] == "X X X X X X X X glioma tumor."
    ctx = encoder.init_context(generator=torch.Generator().manual_seed(0))
    assert ctx.shape == (8, encoder.width)
    assert ctx.std().item() == pytest.approx(0.02, rel=0.2)
    assert encoder.encode(ctx).shape == (len(CLASSES), backbone.embed_dim)


def test_bad_arguments_are_rejected(backbone):
    with pytest.raises(ValueError, match="n_ctx"):
        PromptTextEncoder(backbone, CLASSES, n_ctx=0)
    with pytest.raises(ValueError, match="classnames"):
        PromptTextEncoder(backbone, [])
    encoder = PromptTextEncoder(backbone, CLASSES)
    with pytest.raises(ValueError, match="shape"):
        encoder.encode(torch.zeros(3, encoder.width))
