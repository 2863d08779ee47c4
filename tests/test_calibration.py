"""Noise calibration: the bounded search lands just below the target, and refuses in a sentence,
within seconds, a budget no noise multiplier in its range meets."""

import math
import time

import pytest

from fedprompt.privacy.calibration import (
    EPSILON_TOLERANCE,
    NOISE_SEARCH_RANGE,
    epsilon_for,
    noise_multiplier_for,
    planned_steps,
    sample_rate,
)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_calibrated_noise_spends_just_under_the_target(accountant):
    sigma = noise_multiplier_for(8.0, 1e-5, 0.032, 300, accountant)
    spent = epsilon_for(sigma, 0.032, 300, 1e-5, accountant)
    assert 8.0 - EPSILON_TOLERANCE <= spent <= 8.0
    # Any less noise would overspend: the search returns the smallest sigma it can vouch for.
    assert epsilon_for(sigma * 0.99, 0.032, 300, 1e-5, accountant) > 8.0 - EPSILON_TOLERANCE


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_budget_too_large_to_mean_anything_is_refused_quickly(accountant):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"privacy.epsilon=1e\+09 is more than this run can spend"):
        noise_multiplier_for(1e9, 1e-3, 0.4, 50, accountant)
    assert time.monotonic() - started < 10


def test_a_budget_no_searched_noise_meets_is_refused():
    with pytest.raises(ValueError, match=r"cannot be met: even noise multiplier 10000"):
        noise_multiplier_for(1e-6, 1e-3, 0.4, 50, "rdp")
    assert NOISE_SEARCH_RANGE[1] == 1e4


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf, math.nan])
def test_an_epsilon_that_is_not_positive_and_finite_is_refused(epsilon):
    with pytest.raises(ValueError, match="positive finite"):
        noise_multiplier_for(epsilon, 1e-5, 0.1, 10, "rdp")


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.5])
def test_a_delta_outside_zero_one_is_refused(delta):
    with pytest.raises(ValueError, match=r"privacy.delta must be in \(0, 1\)"):
        noise_multiplier_for(1.0, delta, 0.1, 10, "rdp")


@pytest.mark.parametrize("batch_size", [0, -4])
def test_a_batch_size_below_one_is_refused(batch_size):
    with pytest.raises(ValueError, match=f"train.batch_size must be at least 1, got {batch_size}"):
        sample_rate(batch_size, 100)


@pytest.mark.parametrize(("rounds", "local_epochs"), [(0, 1), (-2, 1), (1, 0), (3, -1)])
def test_fewer_than_one_round_or_local_epoch_is_refused(rounds, local_epochs):
    with pytest.raises(ValueError, match="rounds and local epochs must be at least 1"):
        planned_steps(rounds, local_epochs, 0.1)
