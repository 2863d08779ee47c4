"""Exact per-sample DP clipping equals a loop over single samples, for any learner."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import create_learner
from fedprompt.learners.coop import CoOp
from fedprompt.privacy import ExactClipping, per_sample_gradients, resolve_clipping

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


class ImageConditionedCoOp(CoOp):
    """CoCoOp-like toy: a meta-net shifts the class text features by a function of the image."""

    text_feature_only = False

    def __init__(self, backbone, classnames):
        super().__init__(backbone, classnames)
        dim = backbone.embed_dim
        self.meta_net = torch.nn.Linear(dim, dim)
        torch.nn.init.normal_(
            self.meta_net.weight, std=0.1, generator=torch.Generator().manual_seed(5)
        )

    def forward(self, image_features):
        image_features = image_features.to(self.ctx.device)
        text = self.text_features()  # (C, D)
        shifted = F.normalize(text[None] + self.meta_net(image_features)[:, None], dim=-1)
        return self._logit_scale * torch.einsum("bd,bcd->bc", image_features, shifted)


def _batch(backbone, n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, backbone.embed_dim, generator=generator), dim=-1)
    return features, torch.randint(len(CLASSES), (n,), generator=generator)


def _loop_over_samples(learner, features, labels):
    """Reference: one backward of the loss of each single sample."""
    params = {n: p for n, p in learner.named_parameters() if p.requires_grad}
    per_sample = {name: [] for name in params}
    for row in range(len(labels)):
        loss = learner.loss(features[row : row + 1], labels[row : row + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, grad in zip(params, grads, strict=True):
            per_sample[name].append(grad)
    return {name: torch.stack(grads) for name, grads in per_sample.items()}


def _assert_close_to_scale(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def _exact(learner, expected_batch_size, max_grad_norm=1.0, noise=0.0, steps=None, **options):
    """An ``ExactClipping`` for ``learner``; ``steps`` (a list) gets one entry per noisy step."""
    return ExactClipping(
        learner,
        noise_multiplier=noise,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        noise_generator=options.pop("noise_generator", None),
        step_hook=lambda optimizer: None if steps is None else steps.append(1),
        **options,
    )


def _learner(kind, backbone):
    if kind == "image_conditioned":
        return ImageConditionedCoOp(backbone, CLASSES)
    return create_learner("coop", backbone, CLASSES, class_specific=kind == "coop_csc")


@pytest.mark.parametrize("kind", ["coop", "coop_csc", "image_conditioned"])
def test_vmap_per_sample_gradients_equal_a_loop(miniature_backbone, kind):
    learner = _learner(kind, miniature_backbone)
    features, labels = _batch(miniature_backbone)
    grads, losses = per_sample_gradients(learner, features, labels)
    expected = _loop_over_samples(learner, features, labels)
    assert set(grads) == set(expected)
    for name in expected:
        assert grads[name].shape == (6, *dict(learner.named_parameters())[name].shape)
        _assert_close_to_scale(grads[name], expected[name])
    torch.testing.assert_close(losses, F.cross_entropy(learner(features), labels, reduction="none"))


def test_loop_method_equals_vmap(miniature_native_backbone):
    learner = create_learner("coop", miniature_native_backbone, CLASSES)
    features, labels = _batch(miniature_native_backbone, n=4, seed=1)
    vmapped, _ = per_sample_gradients(learner, features, labels, method="vmap", chunk_size=3)
    looped, _ = per_sample_gradients(learner, features, labels, method="loop")
    _assert_close_to_scale(vmapped["ctx"], looped["ctx"])


@pytest.mark.parametrize("kind", ["coop", "image_conditioned"])
def test_noiseless_exact_step_equals_hand_written_clip_and_sum(miniature_backbone, kind):
    learner = _learner(kind, miniature_backbone)
    features, labels = _batch(miniature_backbone, n=6, seed=2)
    expected = _loop_over_samples(learner, features, labels)
    names = list(expected)
    norms = torch.cat([g.flatten(1) for g in expected.values()], dim=1).norm(dim=1)
    max_grad_norm = norms.median().item()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    want = {name: torch.einsum("b,b...->...", factors, expected[name]) / 8 for name in names}

    steps = []
    clipper = _exact(learner, 8, max_grad_norm, steps=steps)
    clipper.private_gradient(features, labels, {})
    assert clipper.method == "vmap"
    for name, param in learner.named_parameters():
        _assert_close_to_scale(param.grad, want[name])
    assert steps == [1]
    assert (factors < 1).any() and (factors == 1).any()
    clipper.close()
    assert not hasattr(learner.ctx, "grad_sample")


def test_empty_batch_gives_zero_gradient_and_one_step(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone)
    steps = []
    clipper = _exact(learner, 4, steps=steps)
    clipper.private_gradient(features[:0], labels[:0], {})
    assert torch.count_nonzero(learner.ctx.grad) == 0
    assert steps == [1]


def test_clipping_mode_follows_the_learner_flags(miniature_backbone):
    coop = create_learner("coop", miniature_backbone, CLASSES)
    conditioned = ImageConditionedCoOp(miniature_backbone, CLASSES)
    assert resolve_clipping(coop, "auto") == "text_features"
    assert resolve_clipping(coop, "exact") == "exact"
    assert resolve_clipping(conditioned, "auto") == "exact"
    with pytest.raises(ValueError, match=r"privacy\.clipping=exact"):
        resolve_clipping(conditioned, "text_features")
    with pytest.raises(ValueError, match=r"Unknown privacy\.clipping"):
        resolve_clipping(coop, "ghost")

    class ExtraTerm(CoOp):  # overrides loss without saying which terms are private
        def loss(self, image_features, labels):
            return super().loss(image_features, labels) + self.ctx.square().sum()

    extra = ExtraTerm(miniature_backbone, CLASSES)
    assert resolve_clipping(extra, "auto") == "exact"
    with pytest.raises(ValueError, match="private_sample_losses"):
        resolve_clipping(extra, "text_features")
    extra.private_sample_losses = lambda similarities, labels, image_features: similarities[:, 0]
    assert resolve_clipping(extra, "auto") == "text_features"


class ViewsAndSpare(CoOp):
    """A loss with a per-record extra input, and a trainable tensor its loss never reaches."""

    required_inputs = ("views",)

    def __init__(self, backbone, classnames):
        super().__init__(backbone, classnames)
        self.spare = torch.nn.Parameter(torch.ones(3))

    def loss(self, image_features, labels, views):
        mixed = F.normalize(image_features + views.mean(dim=1), dim=-1)
        return F.cross_entropy(self(mixed), labels)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_each_record_gets_its_own_extras_and_unused_tensors_get_zero(miniature_backbone, method):
    learner = ViewsAndSpare(miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=3, seed=4)
    generator = torch.Generator().manual_seed(6)
    views = F.normalize(
        torch.randn(3, 2, miniature_backbone.embed_dim, generator=generator), dim=-1
    )
    grads, losses = per_sample_gradients(learner, features, labels, {"views": views}, method=method)
    assert set(grads) == {"ctx", "spare"}
    assert torch.equal(grads["spare"], torch.zeros(3, 3))
    for row in range(3):
        loss = learner.loss(features[row : row + 1], labels[row : row + 1], views[row : row + 1])
        (want,) = torch.autograd.grad(loss, learner.ctx)
        _assert_close_to_scale(grads["ctx"][row], want)
        torch.testing.assert_close(losses[row], loss.detach())


class DataDependent(CoOp):
    """A loss with data-dependent control flow, which ``torch.func.vmap`` cannot run."""

    def loss(self, image_features, labels):
        if labels.sum().item() < 0:
            raise AssertionError("unreachable")
        return super().loss(image_features, labels)


def test_auto_falls_back_to_one_backward_per_record_and_says_so(miniature_backbone, caplog):
    learner = DataDependent(miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=3, seed=5)
    expected = _loop_over_samples(learner, features, labels)["ctx"]
    clipper = _exact(learner, 3, max_grad_norm=1e9)
    with caplog.at_level("WARNING", logger="fedprompt.privacy.per_sample_gradients"):
        loss = clipper.private_gradient(features, labels, {})
    assert clipper.method == "loop"
    _assert_close_to_scale(learner.ctx.grad, expected.sum(dim=0) / 3)
    torch.testing.assert_close(loss, F.cross_entropy(learner(features), labels, reduction="sum"))
    (record,) = caplog.records
    with pytest.raises(RuntimeError) as raised:
        per_sample_gradients(learner, features, labels)
    first_line = str(raised.value).splitlines()[0]  # the log quotes the error's first line
    assert record.getMessage() == (
        f"DataDependent's loss cannot run under torch.func.vmap ({first_line}); exact DP "
        "clipping falls back to one backward pass per record."
    )
    caplog.clear()
    clipper.private_gradient(features, labels, {})  # decided once: no second attempt, no log
    assert clipper.method == "loop" and not caplog.records
    clipper.close()


def test_an_empty_batch_has_empty_gradients_and_losses(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES, class_specific=True)
    features, labels = _batch(miniature_backbone)
    grads, losses = per_sample_gradients(learner, features[:0], labels[:0])
    assert grads["ctx"].shape == (0, *learner.ctx.shape) and losses.shape == (0,)


def test_an_unknown_method_is_refused_in_one_sentence(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=2)
    with pytest.raises(ValueError) as error:
        per_sample_gradients(learner, features, labels, method="batched")
    assert str(error.value) == "Unknown per-sample gradient method 'batched'; use vmap or loop."


class FeatureDropout(CoOp):
    """Dropout on each record's image features, as a learner's training-time dropout does."""

    def loss(self, image_features, labels):
        return F.cross_entropy(self(F.dropout(image_features, p=0.5)), labels)


def test_each_record_draws_its_own_randomness_and_nothing_warns(miniature_backbone):
    learner = FeatureDropout(miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=1)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads, _ = per_sample_gradients(learner, features.expand(6, -1), labels.expand(6))
    assert [str(warning.message) for warning in caught] == []
    # Six copies of one record: with one dropout mask per record, their gradients differ.
    assert len({tuple(row.flatten().tolist()) for row in grads["ctx"]}) > 1


def _count_loss_calls(monkeypatch):
    """How often the private loss is traced: once per ``vmap`` chunk."""
    module = importlib.import_module("fedprompt.privacy.per_sample_gradients")
    calls = []
    traced = module.private_loss

    def counted(*args):
        calls.append(1)
        return traced(*args)

    monkeypatch.setattr(module, "private_loss", counted)
    return calls


def test_chunk_size_bounds_the_records_per_vmap_call(miniature_backbone, monkeypatch):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=7, seed=8)
    calls = _count_loss_calls(monkeypatch)
    whole, _ = per_sample_gradients(learner, features, labels)
    assert len(calls) == 1
    chunked, _ = per_sample_gradients(learner, features, labels, chunk_size=3)
    assert len(calls) == 1 + 3  # 3 + 3 + 1 records
    _assert_close_to_scale(chunked["ctx"], whole["ctx"])
    clipper = _exact(learner, 7, chunk_size=2)
    for expected in (4 + 4, 4 + 4 + 4):  # the first step decides vmap; the next keeps chunking
        clipper.private_gradient(features, labels, {})
        assert len(calls) == expected
    assert clipper.method == "vmap"
    clipper.close()


class WarnsItself(CoOp):
    """A loss that warns about something of its own."""

    def loss(self, image_features, labels):
        warnings.warn("a warning of the learner's own", UserWarning, stacklevel=2)
        return super().loss(image_features, labels)


def test_only_the_slow_batching_warning_is_silenced_under_vmap(miniature_backbone):
    learner = WarnsItself(miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=3, seed=9)
    with pytest.warns(UserWarning, match="a warning of the learner's own"):
        per_sample_gradients(learner, features, labels)


def test_the_noise_comes_from_the_generator_given(miniature_backbone):
    features, labels = _batch(miniature_backbone, n=4, seed=10)

    def noisy_gradient(seed):
        learner = create_learner("coop", miniature_backbone, CLASSES)
        clipper = _exact(
            learner, 4, noise=1.0, noise_generator=torch.Generator().manual_seed(seed)
        )
        clipper.private_gradient(features, labels, {})
        clipper.close()
        return learner.ctx.grad

    first = noisy_gradient(7)
    torch.manual_seed(123)  # the global generator moves on; the given one decides the noise
    assert torch.equal(noisy_gradient(7), first)
    assert not torch.equal(noisy_gradient(8), first)
