"""The noisy aggregator: Opacus' DPOptimizer used for its pre_step only (clip, sum, noise, scale,
account), with the secure-mode noise drawn from the run's generator."""

import pytest
import torch
from opacus.optimizers.optimizer import _generate_noise

from fedprompt.privacy.noisy_aggregation import noisy_aggregator, release_per_sample_state

# Three records' gradients of one 3-vector weight: norms 5, 0.5 and 0.
GRAD_SAMPLE = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.0, 0.4], [0.0, 0.0, 0.0]])


def _aggregator(weight, *, noise=0.7, norm=1.0, batch=8, seed=3, hook=None):
    return noisy_aggregator(
        [weight],
        noise_multiplier=noise,
        max_grad_norm=norm,
        expected_batch_size=batch,
        noise_generator=torch.Generator().manual_seed(seed),
        step_hook=hook if hook is not None else lambda _: None,
    )


def test_the_private_gradient_is_clipped_summed_secure_noised_and_divided_by_the_batch():
    weight = torch.nn.Parameter(torch.zeros(3))
    calls = []
    optimizer = _aggregator(weight, hook=calls.append)
    weight.grad_sample = GRAD_SAMPLE.clone()
    optimizer.pre_step()

    # Each record clipped to norm 1 (Opacus divides by norm + 1e-6), then summed.
    clipped = GRAD_SAMPLE[0] / (5.0 + 1e-6) + GRAD_SAMPLE[1]
    # Opacus' secure_mode draw (Holohan and Braghin 2021) from a generator seeded as the run's.
    noise = _generate_noise(
        std=0.7 * 1.0,
        reference=torch.zeros(3),
        generator=torch.Generator().manual_seed(3),
        secure_mode=True,
    )
    torch.testing.assert_close(weight.grad, (clipped + noise) / 8, rtol=0, atol=1e-7)
    assert calls == [optimizer]  # the ledger's hook accounts the noisy step once
    assert torch.equal(weight.detach(), torch.zeros(3))  # pre_step never moves the weight


def test_the_same_generator_seed_gives_the_same_noise_and_another_seed_other_noise():
    grads = []
    for seed in (5, 5, 6):
        weight = torch.nn.Parameter(torch.zeros(3))
        optimizer = _aggregator(weight, seed=seed)
        weight.grad_sample = GRAD_SAMPLE.clone()
        optimizer.pre_step()
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert not torch.allclose(grads[0], grads[2])


def test_a_stray_step_of_the_wrapped_optimizer_never_moves_the_weight():
    """The learner's own optimizer applies the private gradient; this one has learning rate 0."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = _aggregator(weight)
    weight.grad_sample = GRAD_SAMPLE.clone()
    optimizer.step()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert torch.equal(weight.detach(), torch.zeros(3))


@pytest.mark.parametrize("norm", [0.0, -1.0])
def test_a_clipping_norm_that_is_not_positive_is_refused(norm):
    with pytest.raises(ValueError) as err:
        _aggregator(torch.nn.Parameter(torch.zeros(3)), norm=norm)
    assert str(err.value) == f"privacy.max_grad_norm must be positive, got {norm}."


def test_a_clipping_norm_below_one_is_accepted():
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = _aggregator(weight, norm=0.25, noise=1e-9, batch=1)
    weight.grad_sample = GRAD_SAMPLE[:1].clone()
    optimizer.pre_step()
    assert float(weight.grad.norm()) == pytest.approx(0.25, rel=1e-5)


def test_release_removes_what_opacus_left_and_tolerates_what_it_did_not():
    both, sample_only, bare = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    both.grad_sample, both.summed_grad = torch.ones(1, 2), torch.ones(2)
    sample_only.grad_sample = torch.ones(1, 2)
    release_per_sample_state(iter([both, sample_only, bare]))
    for param in (both, sample_only, bare):
        assert not hasattr(param, "grad_sample") and not hasattr(param, "summed_grad")
