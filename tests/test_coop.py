"""CoOp: its trainable state travels between sites intact, and it learns."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import create_learner
from fedprompt.learners.coop import CoOp

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


@pytest.fixture(params=["miniature", "miniature-native"])
def backbone(request):
    fixture = "miniature_backbone" if request.param == "miniature" else "miniature_native_backbone"
    return request.getfixturevalue(fixture)


def _image_features(backbone, n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, backbone.embed_dim, generator=generator), dim=-1)


def test_only_the_context_is_trainable(backbone):
    learner = CoOp(backbone, CLASSES)
    assert list(learner.state_dict()) == ["ctx"]
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    assert learner.num_trainable() == 4 * learner.prompt_encoder.width
    learner.train()
    assert not backbone.model.training


def test_context_starts_from_a_photo_of_a(backbone):
    learner = CoOp(backbone, CLASSES)
    tokens = backbone.tokenizer(["a photo of a"])[:, 1:5]
    model = backbone.model
    embed = (
        model.text.transformer.get_input_embeddings()
        if backbone.text_kind == "hf_bert"
        else model.token_embedding
    )
    torch.testing.assert_close(learner.ctx.detach(), embed(tokens)[0])


def test_logits_are_scaled_cosine_similarities(backbone):
    learner = CoOp(backbone, CLASSES)
    images = _image_features(backbone)
    logits = learner(images)
    assert logits.shape == (6, len(CLASSES))
    expected = backbone.logit_scale() * images @ learner.text_features().t()
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(learner.text_features().norm(dim=-1), torch.ones(len(CLASSES)))


@pytest.mark.parametrize("class_specific", [False, True])
def test_trainable_state_round_trip_reproduces_logits(backbone, class_specific):
    source = CoOp(backbone, CLASSES, class_specific=class_specific)
    with torch.no_grad():
        source.ctx.add_(
            0.1 * torch.randn(source.ctx.shape, generator=torch.Generator().manual_seed(1))
        )
    state = source.trainable_state()
    assert set(state) == {"ctx"}
    assert state["ctx"].dtype == torch.float32 and state["ctx"].device.type == "cpu"
    assert not state["ctx"].requires_grad
    state["ctx"].zero_()  # a copy: the learner is untouched
    assert source.ctx.abs().sum() > 0

    target = CoOp(backbone, CLASSES, class_specific=class_specific)
    target.load_trainable_state(source.trainable_state())
    images = _image_features(backbone)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))
    numpy_state = {key: value.numpy() for key, value in source.trainable_state().items()}
    target.load_trainable_state(numpy_state)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_bad_trainable_state_names_the_key(miniature_backbone):
    learner = CoOp(miniature_backbone, CLASSES)
    ctx = learner.trainable_state()["ctx"]
    with pytest.raises(ValueError, match=r"unexpected \['prompt'\]"):
        learner.load_trainable_state({"prompt": ctx})
    with pytest.raises(ValueError, match=r"missing \['ctx'\]"):
        learner.load_trainable_state({})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        learner.load_trainable_state({"ctx": ctx, "extra": ctx})
    with pytest.raises(ValueError, match=r"'ctx' has shape \(4, 3\), expected \(4, 48\)"):
        learner.load_trainable_state({"ctx": np.zeros((4, 3), dtype=np.float32)})


def test_deepcopy_shares_the_backbone(miniature_backbone):
    learner = CoOp(miniature_backbone, CLASSES)
    clone = copy.deepcopy(learner)
    assert clone.backbone is miniature_backbone
    assert clone.ctx is not learner.ctx
    torch.testing.assert_close(clone.text_features(), learner.text_features())


def test_sgd_steps_reduce_the_loss_on_a_learnable_task(backbone):
    # Images lie near the text features of a perturbed context: a CoOp context can fit them.
    torch.manual_seed(0)
    teacher = CoOp(backbone, CLASSES)
    with torch.no_grad():
        teacher.ctx.add_(torch.randn_like(teacher.ctx))
        targets = teacher.text_features()
    labels = torch.arange(len(CLASSES)).repeat(16)
    noise = 0.05 * torch.randn(len(labels), backbone.embed_dim)
    images = F.normalize(targets[labels] + noise, dim=-1)

    learner = create_learner("coop", backbone, CLASSES)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    losses = []
    for _ in range(25):
        loss = learner.loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
