"""Every registered learner: shapes, gradients, federation round trip, learning, declared flags."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from flwr.app import ArrayRecord

from fedprompt.learners import Learner, create_learner, list_learners
from fedprompt.learners.base import EXTRA_INPUTS
from fedprompt.learners.coop import CoOp
from fedprompt.learners.prompt_groups import GroupedPromptEncoder

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
METHOD_CONFIGS = Path(__file__).parents[1] / "configs" / "method"
LEARNERS = list_learners()
TRAINABLE = [name for name in LEARNERS if name != "zeroshot"]
PATCHES = 12
# Adapters act on logits directly, prompts through the text tower: their natural step sizes differ.
TASK_LR = {"clip_adapter": 1.0, "linear_probe": 1.0}


@pytest.fixture(scope="module")
def built_learners(miniature_backbone):
    """One learner per method with the paper defaults, built once (construction encodes text)."""
    torch.manual_seed(0)
    return {name: create_learner(name, miniature_backbone, CLASSES) for name in LEARNERS}


@pytest.fixture
def learners(built_learners):
    """The module's learners, given back as built after each test, whatever the test changed."""
    saved = {name: copy.deepcopy(learner.state_dict()) for name, learner in built_learners.items()}
    yield built_learners
    for name, learner in built_learners.items():
        learner.load_state_dict(saved[name])
        learner.zero_grad(set_to_none=True)
        learner.eval()


def _batch(backbone, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, backbone.embed_dim, generator=generator), dim=-1)
    labels = torch.arange(n) % len(CLASSES)
    return features, labels


def _extras(learner, features, seed=0):
    """Extra inputs consistent with the images: noisy views and patch tokens around each image."""
    generator = torch.Generator().manual_seed(seed)
    n, dim = features.shape
    made = {
        "views": F.normalize(
            features.unsqueeze(1) + 0.1 * torch.randn(n, 2, dim, generator=generator), dim=-1
        ),
        "patch_tokens": features.unsqueeze(1)
        + 0.5 * torch.randn(n, PATCHES, dim, generator=generator),
    }
    return {name: made[name] for name in learner.required_inputs}


def _perturb(learner, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in learner.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("name", LEARNERS)
def test_logits_and_loss_are_finite_with_the_right_shape(learners, miniature_backbone, name):
    learner = learners[name]
    features, labels = _batch(miniature_backbone)
    logits = learner(features)
    assert logits.shape == (8, len(CLASSES)) and torch.isfinite(logits).all()
    loss = learner.loss(features, labels, **_extras(learner, features))
    assert loss.dim() == 0 and torch.isfinite(loss)
    text = learner.text_features()
    assert text.shape == (len(CLASSES), miniature_backbone.embed_dim)
    assert learner.name == name and set(learner.required_inputs) <= set(EXTRA_INPUTS)


@pytest.mark.parametrize("name", TRAINABLE)
def test_gradients_reach_every_own_tensor_and_nothing_else(learners, miniature_backbone, name):
    learner = learners[name]
    learner.zero_grad(set_to_none=True)
    learner.train()
    assert not miniature_backbone.model.training
    assert all(not p.requires_grad for p in miniature_backbone.model.parameters())
    features, labels = _batch(miniature_backbone)
    learner.loss(features, labels, **_extras(learner, features)).backward()
    learner.eval()
    for param_name, param in learner.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), param_name
    assert sum(p.grad.abs().sum() for p in learner.parameters()) > 0
    assert all(p.grad is None for p in miniature_backbone.model.parameters())
    assert all("backbone" not in key for key in learner.state_dict())


@pytest.mark.parametrize("name", LEARNERS)
def test_trainable_state_round_trips_through_an_array_record(learners, miniature_backbone, name):
    torch.manual_seed(1)
    source = create_learner(name, miniature_backbone, CLASSES)
    _perturb(source)
    state = source.trainable_state()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    received = ArrayRecord(state).to_torch_state_dict()
    torch.manual_seed(2)
    target = create_learner(name, miniature_backbone, CLASSES)
    target.load_trainable_state(received)
    features, _ = _batch(miniature_backbone, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(target(features), source(features))
    assert sum(t.numel() for t in state.values()) == source.num_trainable()


def _learnable_task(backbone, n_per_class=4, seed=0):
    """Images near the class features of a perturbed CoOp prompt: a prompt can fit them."""
    torch.manual_seed(seed)
    teacher = CoOp(backbone, CLASSES)
    with torch.no_grad():
        teacher.ctx.add_(torch.randn_like(teacher.ctx))
        targets = teacher.text_features()
    labels = torch.arange(len(CLASSES)).repeat(n_per_class)
    noise = 0.05 * torch.randn(len(labels), backbone.embed_dim)
    return F.normalize(targets[labels] + noise, dim=-1), labels


@pytest.mark.parametrize("name", TRAINABLE)
def test_sgd_improves_on_a_learnable_task(miniature_backbone, name):
    features, labels = _learnable_task(miniature_backbone)
    torch.manual_seed(0)
    learner = create_learner(name, miniature_backbone, CLASSES)
    extras = _extras(learner, features)

    def task_loss():
        with torch.no_grad():
            return F.cross_entropy(learner(features), labels).item()

    before = task_loss()
    optimizer = torch.optim.SGD(learner.parameters(), lr=TASK_LR.get(name, 0.1), momentum=0.9)
    learner.train()
    for _ in range(10):
        optimizer.zero_grad()
        learner.loss(features, labels, **extras).backward()
        optimizer.step()
    learner.eval()
    assert task_loss() < 0.9 * before


def test_zero_shot_has_nothing_to_train_and_needs_no_data(miniature_backbone):
    learner = create_learner("zeroshot", miniature_backbone, CLASSES)
    assert not learner.needs_training and learner.num_trainable() == 0
    assert learner.trainable_state() == {} and list(learner.parameters()) == []
    assert ArrayRecord(learner.trainable_state()).to_torch_state_dict() == {}
    learner.load_trainable_state({})
    assert all(create_learner(n, miniature_backbone, CLASSES).needs_training for n in TRAINABLE)


@pytest.mark.parametrize("name", [n for n in LEARNERS if n not in ("zeroshot",)])
def test_missing_or_unexpected_extras_are_clear_errors(learners, miniature_backbone, name):
    learner = learners[name]
    features, labels = _batch(miniature_backbone)
    extras = _extras(learner, features)
    if learner.required_inputs:
        with pytest.raises(ValueError, match=learner.required_inputs[0]):
            learner.loss(features, labels)
    with pytest.raises(TypeError, match="does not use"):
        learner.loss(features, labels, **extras, unused=features)


@pytest.mark.parametrize("name", LEARNERS)
def test_text_feature_only_learners_reach_parameters_only_through_text_features(
    learners, miniature_backbone, name, monkeypatch
):
    learner = learners[name]
    if not learner.text_feature_only:
        pytest.skip(f"{name} declares text_feature_only = False")
    learner.zero_grad(set_to_none=True)
    frozen = learner.text_features().detach().requires_grad_()
    monkeypatch.setattr(learner, "text_features", lambda: frozen)
    features, labels = _batch(miniature_backbone)
    learner.loss(features, labels, **_extras(learner, features)).backward()
    assert frozen.grad is not None
    assert all(p.grad is None for p in learner.parameters())


@pytest.mark.parametrize("name", LEARNERS)
def test_per_sample_losses_average_to_the_batch_loss(learners, miniature_backbone, name):
    learner = learners[name]
    if not learner.per_sample_loss:
        pytest.skip(f"{name} declares per_sample_loss = False")
    features, labels = _batch(miniature_backbone, n=4)
    extras = _extras(learner, features)
    with torch.no_grad():
        batch = learner.loss(features, labels, **extras)
        single = [
            learner.loss(
                features[i : i + 1],
                labels[i : i + 1],
                **{k: v[i : i + 1] for k, v in extras.items()},
            )
            for i in range(4)
        ]
    torch.testing.assert_close(batch, torch.stack(single).mean(), rtol=1e-5, atol=1e-6)


def test_every_learner_has_a_config_the_constructor_accepts(miniature_backbone):
    names = sorted(path.stem for path in METHOD_CONFIGS.glob("*.yaml"))
    assert names == LEARNERS
    for name in names:
        config = yaml.safe_load((METHOD_CONFIGS / f"{name}.yaml").read_text())
        assert config.pop("name") == name
        learner = create_learner(name, miniature_backbone, CLASSES, **config)
        assert isinstance(learner, Learner)


@pytest.mark.parametrize("fixture", ["miniature_backbone", "miniature_native_backbone"])
def test_grouped_prompts_match_one_prompt_at_a_time(request, fixture):
    backbone = request.getfixturevalue(fixture)
    encoder = GroupedPromptEncoder(backbone, CLASSES, n_ctx=4)
    generator = torch.Generator().manual_seed(0)
    contexts = 0.1 * torch.randn(3, 4, encoder.width, generator=generator)
    with torch.no_grad():
        grouped = encoder.encode_groups(contexts)
        separate = torch.stack([encoder.encode(ctx) for ctx in contexts])
    torch.testing.assert_close(grouped, separate, rtol=1e-4, atol=1e-5)


def test_cocoop_prompts_depend_on_the_image(miniature_backbone):
    torch.manual_seed(0)
    learner = create_learner("cocoop", miniature_backbone, CLASSES)
    _perturb(learner, seed=5)
    features, _ = _batch(miniature_backbone, n=2)
    with torch.no_grad():
        text = learner.conditional_text_features(features)
    assert text.shape == (2, len(CLASSES), miniature_backbone.embed_dim)
    assert not torch.allclose(text[0], text[1])


def test_prograd_steps_along_the_projected_gradient(miniature_backbone):
    from fedprompt.learners.prograd import distillation_loss, project_gradient

    torch.manual_seed(0)
    learner = create_learner("prograd", miniature_backbone, CLASSES)
    _perturb(learner, seed=4)
    features, labels = _batch(miniature_backbone)
    loss = learner.loss(features, labels)
    loss.backward()
    logits = learner(features)
    ce = F.cross_entropy(logits, labels)
    teacher = learner._logit_scale * features @ learner.zeroshot_features.t()
    (task,) = torch.autograd.grad(ce, learner.ctx, retain_graph=True)
    (general,) = torch.autograd.grad(distillation_loss(logits, teacher, 1.0), learner.ctx)
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(learner.ctx.grad, project_gradient(task, general, 1.0))
