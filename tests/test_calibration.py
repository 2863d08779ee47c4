"""Noise calibration: the bounded search lands just below the target, and refuses in a sentence,
within seconds, a budget no noise multiplier in its range meets."""

import math
import re
import warnings

import pytest

from fedprompt.privacy import calibration
from fedprompt.privacy.calibration import (
    EPSILON_TOLERANCE,
    MAX_SEARCH_STEPS,
    NOISE_SEARCH_RANGE,
    check_accountant,
    default_delta,
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
def test_a_budget_too_large_to_mean_anything_is_refused_quickly(accountant, monkeypatch):
    calls = []
    real = calibration.epsilon_for
    monkeypatch.setattr(calibration, "epsilon_for", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(ValueError, match=r"privacy.epsilon=1e\+09 is more than this run can spend"):
        noise_multiplier_for(1e9, 1e-3, 0.4, 50, accountant)
    assert len(calls) == 1  # one accountant call, at the least noise: no search before refusing


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


def _made_up_accountant(monkeypatch, curve):
    """Replaces the accountant by ``curve`` (noise multiplier -> epsilon); returns the noise
    multipliers the calibration asks about, in order."""
    asked = []

    def spent(noise_multiplier, rate, steps, delta, accountant):
        asked.append(noise_multiplier)
        return curve(noise_multiplier)

    monkeypatch.setattr(calibration, "epsilon_for", spent)
    return asked


def test_the_search_bisects_on_a_log_scale_and_stops_at_the_first_noise_within_tolerance(
    monkeypatch,
):
    def curve(sigma):
        return 100.0 / sigma

    asked = _made_up_accountant(monkeypatch, curve)
    sigma = noise_multiplier_for(10.0, 1e-5, 0.1, 50, "rdp")
    assert asked[:2] == list(NOISE_SEARCH_RANGE)  # the reachability check, at both ends
    middles = asked[2:]
    low, high = NOISE_SEARCH_RANGE
    for middle in middles:
        assert middle == math.sqrt(low * high)
        if curve(middle) > 10.0:
            low = middle
        else:
            high = middle
    assert sigma == high == middles[-1]
    assert 10.0 - EPSILON_TOLERANCE <= curve(sigma) <= 10.0
    # It stops at once: no noise asked before the last one was within the tolerance.
    assert all(not 10.0 - EPSILON_TOLERANCE <= curve(m) <= 10.0 for m in middles[:-1])
    assert len(middles) <= MAX_SEARCH_STEPS


def test_the_most_noise_within_tolerance_of_the_target_is_returned_without_a_search(monkeypatch):
    asked = _made_up_accountant(monkeypatch, lambda sigma: 100.0 / sigma - 0.01)
    # Epsilon 0.0 at noise 1e4: exactly EPSILON_TOLERANCE below the target.
    assert noise_multiplier_for(EPSILON_TOLERANCE, 1e-5, 0.1, 50, "rdp") == 1e4
    assert asked == [0.3, 1e4]


def test_a_noise_that_spends_exactly_the_target_meets_it(monkeypatch):
    asked = _made_up_accountant(monkeypatch, lambda sigma: 100.0 / sigma)
    middle = math.sqrt(0.3 * 1e4)  # the search's first guess
    assert noise_multiplier_for(100.0 / middle, 1e-5, 0.1, 50, "rdp") == middle
    assert asked == [0.3, 1e4, middle]
    # The largest noise spends exactly the target: it meets it, no search needed.
    assert noise_multiplier_for(100.0 / 1e4, 1e-5, 0.1, 50, "rdp") == 1e4


def test_the_least_noise_spending_exactly_the_target_meets_it(monkeypatch):
    _made_up_accountant(monkeypatch, lambda sigma: 100.0 / sigma)
    sigma = noise_multiplier_for(100.0 / 0.3, 1e-5, 0.1, 50, "rdp")
    assert sigma >= 0.3 and 100.0 / 0.3 - EPSILON_TOLERANCE <= 100.0 / sigma <= 100.0 / 0.3


def test_the_search_gives_up_after_max_search_steps_with_noise_that_meets_the_target(
    monkeypatch,
):
    # A jump from far above the target to far below it at 7: no noise is within tolerance.
    asked = _made_up_accountant(monkeypatch, lambda sigma: 1000.0 if sigma < 7.0 else 0.0)
    sigma = noise_multiplier_for(5.0, 1e-5, 0.1, 50, "rdp")
    assert len(asked) == 2 + MAX_SEARCH_STEPS
    assert 7.0 <= sigma < 7.0 * (1 + 1e-12)


def test_the_refusal_of_a_budget_too_large_names_the_most_the_run_can_spend(monkeypatch):
    _made_up_accountant(monkeypatch, lambda sigma: 100.0 / sigma)
    with pytest.raises(ValueError) as err:
        noise_multiplier_for(1e9, 1e-3, 0.4, 50, "rdp")
    assert str(err.value) == (
        "privacy.epsilon=1e+09 is more than this run can spend: even the least noise searched "
        "(noise multiplier 0.3) spends only epsilon 333.3 over its 50 steps; choose "
        "privacy.epsilon at most 333.3, or privacy=none for no differential privacy."
    )


@pytest.mark.parametrize("most", [333.36, 333.34, 12.0])
def test_the_epsilon_a_too_large_budget_is_told_to_choose_is_accepted(monkeypatch, most):
    _made_up_accountant(monkeypatch, lambda sigma: most * 0.3 / sigma)
    with pytest.raises(ValueError) as err:
        noise_multiplier_for(1e9, 1e-3, 0.4, 50, "rdp")
    advised = float(re.search(r"choose privacy\.epsilon at most ([0-9.]+),", str(err.value))[1])
    assert most - 0.1 < advised <= most
    assert noise_multiplier_for(advised, 1e-3, 0.4, 50, "rdp") >= 0.3


def test_the_refusal_of_a_budget_too_small_names_what_to_change(monkeypatch):
    _made_up_accountant(monkeypatch, lambda sigma: 100.0 / sigma)
    with pytest.raises(ValueError) as err:
        noise_multiplier_for(0.001, 1e-3, 0.4, 50, "rdp")
    assert str(err.value) == (
        "privacy.epsilon=0.001 cannot be met: even noise multiplier 10000 spends epsilon 0.01 "
        "over 50 steps; raise privacy.epsilon or take fewer steps (federation.rounds, "
        "train.local_epochs, a larger train.batch_size)."
    )


def test_an_epsilon_below_one_is_calibrated(monkeypatch):
    _made_up_accountant(monkeypatch, lambda sigma: 100.0 / sigma)
    assert 100.0 / noise_multiplier_for(0.5, 1e-5, 0.1, 50, "rdp") >= 0.5 - EPSILON_TOLERANCE


def test_the_refusals_of_an_epsilon_or_delta_out_of_range_are_whole_sentences():
    with pytest.raises(ValueError) as err:
        noise_multiplier_for(0.0, 1e-5, 0.1, 10, "rdp")
    assert str(err.value) == "privacy.epsilon must be a positive finite number, got 0.0."
    with pytest.raises(ValueError) as err:
        noise_multiplier_for(1.0, 1.0, 0.1, 10, "rdp")
    assert str(err.value) == "privacy.delta must be in (0, 1), got 1.0."


def test_an_unknown_accountant_is_refused_in_one_sentence():
    assert check_accountant("prv") == "prv" and check_accountant("rdp") == "rdp"
    with pytest.raises(ValueError) as err:
        check_accountant("gdp")
    assert str(err.value) == "Unknown privacy.accountant 'gdp'; use one of ['rdp', 'prv']."
    with pytest.raises(ValueError, match=r"Unknown privacy\.accountant"):
        epsilon_for(1.0, 0.1, 10, 1e-5, "gdp")


def test_one_record_one_batch_one_round_is_the_smallest_plan():
    assert sample_rate(1, 1) == 1.0
    assert sample_rate(1, 100) == 0.01
    assert planned_steps(1, 1, 0.1) == 10
    assert default_delta(1) == 0.1


def test_the_plan_refusals_are_whole_sentences():
    with pytest.raises(ValueError) as err:
        sample_rate(32, 0)
    assert str(err.value) == "A site with no training records cannot train with DP-SGD."
    with pytest.raises(ValueError) as err:
        sample_rate(0, 10)
    assert str(err.value) == "train.batch_size must be at least 1, got 0."
    with pytest.raises(ValueError) as err:
        planned_steps(0, 2, 0.1)
    assert str(err.value) == "rounds and local epochs must be at least 1, got 0, 2."
    with pytest.raises(ValueError) as err:
        default_delta(0)
    assert str(err.value) == "A site with no training records has no default delta."


def test_no_steps_spend_nothing_and_one_step_spends_something():
    assert epsilon_for(1.0, 0.1, 0, 1e-5, "rdp") == 0.0
    assert epsilon_for(1.0, 0.1, 1, 1e-5, "rdp") > 0.0


@pytest.mark.parametrize(("sigma", "rate", "steps"), [(1e4, 0.1, 10), (0.3, 0.9, 1000)])
def test_an_epsilon_at_the_end_of_the_rdp_orders_warns_nothing(sigma, rate, steps):
    """Opacus warns when the best order is the grid's largest or smallest; that is expected at
    the ends of the noise search, and its users should not see it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert epsilon_for(sigma, rate, steps, 1e-5, "rdp") > 0
