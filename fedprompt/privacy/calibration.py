"""Plans a site's DP-SGD run up front: sampling rate, step count, delta and noise multiplier."""

from __future__ import annotations

import math
import warnings

from opacus.accountants import create_accountant

NOISE_SEARCH_RANGE = (0.3, 1.0e4)
"""Noise multipliers the calibration searches. Below 0.3 a run spends epsilons in the hundreds
(nothing a DP claim can rest on) and the PRV accountant slows to seconds per evaluation and
gigabytes of memory; above 1e4 no prompt learns anything."""
EPSILON_TOLERANCE = 0.01
"""The calibrated run ends within this much below its target epsilon (as Opacus' search does)."""
MAX_SEARCH_STEPS = 60
"""Bisection steps at most: halving the log-range 60 times is far finer than the tolerance."""

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""Opacus accountants a ledger may use: Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019) and
the numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz 2021)."""


def check_accountant(name: str) -> str:
    """The accountant's name, checked against ``ACCOUNTANTS``.

    Raises:
        ValueError: Not an accountant this project reports with.
    """
    if name not in ACCOUNTANTS:
        raise ValueError(f"Unknown privacy.accountant {name!r}; use one of {list(ACCOUNTANTS)}.")
    return name


def sample_rate(batch_size: int, num_records: int) -> float:
    """Poisson sampling rate q = batch_size / n, capped at 1 (a batch at least n is all records).

    Raises:
        ValueError: No records or a batch size below 1.
    """
    if num_records < 1:
        raise ValueError("A site with no training records cannot train with DP-SGD.")
    if batch_size < 1:
        raise ValueError(f"train.batch_size must be at least 1, got {batch_size}.")
    return min(1.0, batch_size / num_records)


def steps_per_epoch(rate: float) -> int:
    """Noisy steps in one epoch: floor(1 / q), as Opacus' Poisson sampler takes (at least 1)."""
    return max(1, int(1.0 / rate))


def planned_steps(rounds: int, local_epochs: int, rate: float) -> int:
    """Noisy steps of a whole run: rounds x local epochs x steps per epoch.

    Every round is counted, as if the site took part in all of them: a site sampled in fewer
    rounds spends less than planned, never more.
    """
    if rounds < 1 or local_epochs < 1:
        raise ValueError(
            f"rounds and local epochs must be at least 1, got {rounds}, {local_epochs}."
        )
    return rounds * local_epochs * steps_per_epoch(rate)


def default_delta(num_records: int) -> float:
    """The default delta, 1 / (10 n): well below 1/n, at which releasing a record is allowed."""
    if num_records < 1:
        raise ValueError("A site with no training records has no default delta.")
    return 1.0 / (10.0 * num_records)


def check_budget_reachable(
    target_epsilon: float, delta: float, rate: float, steps: int, accountant: str
) -> float:
    """Check that some noise multiplier in ``NOISE_SEARCH_RANGE`` meets the budget.

    Two accountant calls, at either end of the range: the check a run makes before it starts.

    Returns:
        The epsilon the largest noise multiplier searched spends.

    Raises:
        ValueError: An epsilon or delta out of range, or a budget outside what the range spends.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"privacy.epsilon must be a positive finite number, got {target_epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"privacy.delta must be in (0, 1), got {delta}.")
    low, high = NOISE_SEARCH_RANGE
    least_noise = epsilon_for(low, rate, steps, delta, accountant)
    if least_noise < target_epsilon:
        # Rounded down, so that the epsilon advised is one this check accepts.
        advised = math.floor(least_noise * 10) / 10
        raise ValueError(
            f"privacy.epsilon={target_epsilon:g} is more than this run can spend: even the least "
            f"noise searched (noise multiplier {low}) spends only epsilon {least_noise:.1f} over "
            f"its {steps} steps; choose privacy.epsilon at most {advised:.1f}, or "
            "privacy=none for no differential privacy."
        )
    most_noise = epsilon_for(high, rate, steps, delta, accountant)
    if most_noise > target_epsilon:
        raise ValueError(
            f"privacy.epsilon={target_epsilon:g} cannot be met: even noise multiplier {high:g} "
            f"spends epsilon {most_noise:.3g} over {steps} steps; raise privacy.epsilon or take "
            "fewer steps (federation.rounds, train.local_epochs, a larger train.batch_size)."
        )
    return most_noise


def noise_multiplier_for(
    target_epsilon: float, delta: float, rate: float, steps: int, accountant: str
) -> float:
    """Smallest noise multiplier that keeps ``steps`` noisy steps within (target_epsilon, delta).

    ``rate`` is the Poisson sampling rate. A bisection over ``NOISE_SEARCH_RANGE`` (on a log
    scale, at most ``MAX_SEARCH_STEPS`` accountant calls, the same accountant the ledger later
    reports with) stops once the run's epsilon lies within ``EPSILON_TOLERANCE`` below the
    target, so a run that takes the planned steps ends at or just below it. The search is
    bounded: a target outside what the range can spend is refused with a sentence, never
    searched for without end.

    Raises:
        ValueError: An epsilon or delta out of range, or a budget no noise multiplier in the
            searched range meets.
    """
    most_noise = check_budget_reachable(target_epsilon, delta, rate, steps, accountant)
    low, high = NOISE_SEARCH_RANGE

    def spent(sigma: float) -> float:
        return epsilon_for(sigma, rate, steps, delta, accountant)

    at_high = most_noise
    for _ in range(MAX_SEARCH_STEPS):
        if target_epsilon - at_high <= EPSILON_TOLERANCE:
            break
        middle = math.sqrt(low * high)
        at_middle = spent(middle)
        if at_middle > target_epsilon:
            low = middle
        else:
            high, at_high = middle, at_middle
    return high


def epsilon_for(
    noise_multiplier: float, rate: float, steps: int, delta: float, accountant: str
) -> float:
    """Epsilon that ``steps`` noisy steps at ``noise_multiplier`` and rate ``rate`` spend."""
    if steps == 0:
        return 0.0
    meter = create_accountant(mechanism=check_accountant(accountant))
    meter.history = [(float(noise_multiplier), float(rate), int(steps))]
    with warnings.catch_warnings():
        # Large noise puts RDP's best order at the grid's end; the bound there is loose
        # (conservative), and a calibrated noise multiplier is not affected.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(meter.get_epsilon(delta=delta))
