"""Plans a site's DP-SGD run up front: sampling rate, step count, delta and noise multiplier."""

from __future__ import annotations

import warnings

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

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


def noise_multiplier_for(
    target_epsilon: float, delta: float, rate: float, steps: int, accountant: str
) -> float:
    """Smallest noise multiplier that keeps ``steps`` noisy steps within (target_epsilon, delta).

    ``rate`` is the Poisson sampling rate. Uses Opacus' ``get_noise_multiplier``, which bisects
    over sigma (to 0.01 in epsilon) with the same accountant the ledger later reports with, so a
    run that takes the planned steps ends at or just below the target.

    Raises:
        ValueError: The budget cannot be met by any noise multiplier Opacus searches.
    """
    if not target_epsilon > 0:
        raise ValueError(f"privacy.epsilon must be positive, got {target_epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"privacy.delta must be in (0, 1), got {delta}.")
    with warnings.catch_warnings():
        # The search's first, very large sigmas put RDP's best order at the grid's end; the
        # bound there is loose (conservative), and the sigma finally chosen is not affected.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=rate,
                steps=steps,
                accountant=check_accountant(accountant),
            )
        )


def epsilon_for(
    noise_multiplier: float, rate: float, steps: int, delta: float, accountant: str
) -> float:
    """Epsilon that ``steps`` noisy steps at ``noise_multiplier`` and rate ``rate`` spend."""
    if steps == 0:
        return 0.0
    meter = create_accountant(mechanism=check_accountant(accountant))
    meter.history = [(float(noise_multiplier), float(rate), int(steps))]
    return float(meter.get_epsilon(delta=delta))
