"""Text-feature-space DP clipping equals a hand-written per-sample clip-and-sum of dL/dT."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import create_learner
from fedprompt.learners.coop import CoOp
from fedprompt.privacy import TextFeatureClipping

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _batch(backbone, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, backbone.embed_dim, generator=generator), dim=-1)
    labels = torch.randint(len(CLASSES), (n,), generator=generator)
    return features, labels


def _assert_close_to_scale(actual, expected):
    """Equal up to float32 round-off relative to the largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def _clipper(learner, max_grad_norm, expected_batch_size, noise=0.0, steps=None, generator=None):
    steps = [] if steps is None else steps
    return TextFeatureClipping(
        learner,
        noise_multiplier=noise,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        noise_generator=generator,
        step_hook=lambda optimizer: steps.append(optimizer.noise_multiplier),
    )


def _hand_clipped_text_gradient(learner, features, labels, max_grad_norm, expected_batch_size):
    """Per-sample dL_i/dT by autograd, each clipped to max_grad_norm, summed, over B_expected."""
    text = learner.text_features().detach()
    scale = learner.backbone.logit_scale()
    total = torch.zeros_like(text)
    norms = []
    for image, label in zip(features, labels, strict=True):
        leaf = text.clone().requires_grad_(True)
        loss = F.cross_entropy(scale * image[None] @ leaf.t(), label[None])
        (grad,) = torch.autograd.grad(loss, leaf)
        norms.append(grad.norm().item())
        total += grad * min(1.0, max_grad_norm / (grad.norm().item() + 1e-6))
    return total / expected_batch_size, norms


@pytest.mark.parametrize("backbone_name", ["miniature_backbone", "miniature_native_backbone"])
def test_noiseless_step_equals_hand_written_clip_and_sum(request, backbone_name):
    backbone = request.getfixturevalue(backbone_name)
    learner = create_learner("coop", backbone, CLASSES)
    features, labels = _batch(backbone)
    _, norms = _hand_clipped_text_gradient(learner, features, labels, 1e9, 10)
    max_grad_norm = sorted(norms)[len(norms) // 2]  # clips about half of the records
    expected, _ = _hand_clipped_text_gradient(learner, features, labels, max_grad_norm, 10)
    (want,) = torch.autograd.grad(learner.text_features(), learner.ctx, grad_outputs=expected)

    steps = []
    clipper = _clipper(learner, max_grad_norm, expected_batch_size=10, steps=steps)
    loss = clipper.private_gradient(features, labels, {})
    clipper.close()

    _assert_close_to_scale(learner.ctx.grad, want)
    assert learner.ctx.grad.abs().max() > 0
    assert steps == [0.0]
    per_sample = F.cross_entropy(learner(features), labels, reduction="none")
    torch.testing.assert_close(loss, per_sample.sum(), rtol=1e-5, atol=1e-5)


def test_noisy_text_gradient_is_the_clipped_mean(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=6, seed=1)
    expected, _ = _hand_clipped_text_gradient(learner, features, labels, 0.5, 4)
    clipper = _clipper(learner, 0.5, expected_batch_size=4)
    noisy, losses = clipper.noisy_text_feature_gradient(
        learner.text_features().detach(), features, labels, {}
    )
    torch.testing.assert_close(noisy, expected, rtol=1e-4, atol=1e-7)
    assert losses.shape == (6,)


def test_without_clipping_it_is_the_ordinary_gradient(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=5, seed=2)
    (plain,) = torch.autograd.grad(learner.loss(features, labels), learner.ctx)
    clipper = _clipper(learner, max_grad_norm=1e9, expected_batch_size=5)
    clipper.private_gradient(features, labels, {})
    # The batch mean of the losses over the actual batch size, which here is the expected one.
    _assert_close_to_scale(learner.ctx.grad, plain)


def test_empty_poisson_batch_is_a_noised_accounted_step(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone)
    steps = []
    clipper = _clipper(learner, 1.0, expected_batch_size=4, steps=steps)
    loss = clipper.private_gradient(features[:0], labels[:0], {})
    assert float(loss) == 0.0
    assert torch.count_nonzero(learner.ctx.grad) == 0
    assert steps == [0.0]

    noisy_steps = []
    generator = torch.Generator().manual_seed(0)
    noisy = _clipper(learner, 1.0, 4, noise=1.0, steps=noisy_steps, generator=generator)
    noisy.private_gradient(features[:0], labels[:0], {})
    assert torch.count_nonzero(learner.ctx.grad) > 0
    assert noisy_steps == [1.0]


def test_noise_has_std_sigma_times_clip_over_expected_batch(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone)
    sigma, clip, expected_batch = 2.0, 0.5, 4
    clipper = _clipper(
        learner, clip, expected_batch, noise=sigma, generator=torch.Generator().manual_seed(3)
    )
    text = learner.text_features().detach()
    draws = torch.stack(
        [
            clipper.noisy_text_feature_gradient(text, features[:0], labels[:0], {})[0]
            for _ in range(8)
        ]
    )
    measured = draws.std().item()
    assert measured == pytest.approx(sigma * clip / expected_batch, rel=0.1)
    assert draws.mean().abs().item() < 0.05 * measured


def test_a_private_loss_that_bypasses_the_similarities_is_refused(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    learner.private_sample_losses = lambda similarities, labels, image_features: (
        F.cross_entropy(similarities, labels, reduction="none") + learner.text_features().sum()
    )
    features, labels = _batch(miniature_backbone)
    with pytest.raises(ValueError) as error:
        _clipper(learner, 1.0, expected_batch_size=8).private_gradient(features, labels, {})
    assert str(error.value) == (
        "CoOp.private_sample_losses reaches the prompt other than through the similarities, "
        "which text-feature clipping cannot bound; set privacy.clipping=exact or use only the "
        "similarities."
    )


class WithSpare(CoOp):
    """A trainable tensor that the class text features never reach."""

    def __init__(self, backbone, classnames):
        super().__init__(backbone, classnames)
        self.spare = torch.nn.Parameter(torch.ones(3))


def test_a_tensor_the_text_features_miss_gets_a_zero_gradient(miniature_backbone):
    learner = WithSpare(miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=4, seed=3)
    _clipper(learner, 1e9, expected_batch_size=4).private_gradient(features, labels, {})
    assert torch.equal(learner.spare.grad, torch.zeros(3))
    (plain,) = torch.autograd.grad(learner.loss(features, labels), learner.ctx)
    _assert_close_to_scale(learner.ctx.grad, plain)


def test_each_step_starts_from_fresh_gradients_and_warns_nothing(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=6, seed=4)
    clipper = _clipper(learner, 0.5, expected_batch_size=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipper.private_gradient(features[:3], labels[:3], {})
        second = clipper.private_gradient(features[3:], labels[3:], {})
    assert [str(warning.message) for warning in caught] == []
    fresh = create_learner("coop", miniature_backbone, CLASSES)
    want = _clipper(fresh, 0.5, expected_batch_size=6).private_gradient(
        features[3:], labels[3:], {}
    )
    torch.testing.assert_close(second, want)
    _assert_close_to_scale(learner.ctx.grad, fresh.ctx.grad)


class DoublePrecision(CoOp):
    """Text features in another dtype than the float32 head (as a half-precision backbone's)."""

    def text_features(self):
        return super().text_features().double()


def test_text_features_and_images_of_another_dtype_are_clipped_in_the_heads(miniature_backbone):
    learner = DoublePrecision(miniature_backbone, CLASSES)
    features, labels = _batch(miniature_backbone, n=4, seed=5)
    features = features.double()
    loss = _clipper(learner, 1e9, expected_batch_size=4).private_gradient(features, labels, {})
    (plain,) = torch.autograd.grad(learner.loss(features, labels), learner.ctx)
    assert learner.ctx.grad.dtype == learner.ctx.dtype
    torch.testing.assert_close(learner.ctx.grad, plain, rtol=1e-4, atol=1e-6)
    want = F.cross_entropy(learner(features), labels, reduction="sum")
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-5)


def test_the_learners_own_losses_see_the_batchs_image_features(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    scale = learner.backbone.logit_scale()
    learner.private_sample_losses = lambda similarities, labels, image_features: (
        F.cross_entropy(scale * similarities, labels, reduction="none") * (2 + image_features[:, 0])
    )
    features, labels = _batch(miniature_backbone, n=5, seed=6)
    loss = _clipper(learner, 1e9, expected_batch_size=5).private_gradient(features, labels, {})
    per_record = F.cross_entropy(learner(features), labels, reduction="none")
    torch.testing.assert_close(loss, (per_record * (2 + features[:, 0])).sum())


class _WarnsInBackward(torch.autograd.Function):
    """Identity whose backward pass warns (a loss term with a warning of its own)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        warnings.warn("a warning of the loss's own backward", UserWarning, stacklevel=1)
        return grad


def test_only_opacus_hook_warning_is_silenced_in_the_backward_pass(miniature_backbone):
    learner = create_learner("coop", miniature_backbone, CLASSES)
    scale = learner.backbone.logit_scale()
    learner.private_sample_losses = lambda similarities, labels, image_features: (
        F.cross_entropy(_WarnsInBackward.apply(scale * similarities), labels, reduction="none")
    )
    features, labels = _batch(miniature_backbone, n=3, seed=7)
    with pytest.warns(UserWarning, match="a warning of the loss's own backward"):
        _clipper(learner, 1.0, expected_batch_size=3).private_gradient(features, labels, {})
