"""The per-site ledger: calibration, spending over rounds, persistence, a dp-accounting check."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.optimizers import DPOptimizer
from scipy import integrate, special

from fedprompt.privacy import (
    SiteLedger,
    default_delta,
    epsilon_for,
    load_or_plan_ledger,
    planned_budget,
    planned_steps,
    sample_rate,
    steps_per_epoch,
)
from fedprompt.privacy import ledger as ledger_module

# Independent check against Google's dp-accounting. Each accountant gets an interval the ledger's
# epsilon must lie in; both ends follow from what the two libraries compute and guarantee, none
# from a measured gap.


def _sampled_gaussian_log_moment(rate, sigma, order):
    """log A_order of the sampled Gaussian (Mironov et al. 2019): its RDP is log(A) / (order - 1).

    A = E[(1 - q + q exp((2z - 1) / (2 sigma^2)))^order] for z ~ N(0, sigma^2): a finite binomial
    sum at an integer order, else this integral by quadrature, less quad's error estimate (so a
    lower bound). Opacus' orders are fractional only below 11, where the integrand fits a float.
    """
    log_q, log_1mq, scale = math.log(rate), math.log1p(-rate), 2 * sigma**2
    if float(order).is_integer():
        n = int(order)
        return float(
            special.logsumexp(
                [
                    math.log(math.comb(n, i)) + i * log_q + (n - i) * log_1mq + (i * i - i) / scale
                    for i in range(n + 1)
                ]
            )
        )

    def integrand(z):
        mixture = np.logaddexp(log_1mq, log_q + (2 * z - 1) / scale)
        return math.exp(order * mixture - z * z / scale) / math.sqrt(math.pi * scale)

    value, error = integrate.quad(
        integrand,
        -60 * sigma,
        60 * sigma + order,
        points=(0.0, order / 2, order),
        epsabs=0,
        epsrel=1e-12,
        limit=500,
    )
    return math.log(value - error)


def _rdp_bounds(dp_accounting, event, rate, sigma, steps, delta):
    """Where Opacus' RDP epsilon (the ledger's) must lie.

    Both libraries turn RDP into (epsilon, delta) by one formula, min over orders a of
    rdp(a) + log1p(-1/a) - log(delta * a) / (a - 1) (Balle et al. 2020, Thm 21), so the conversion
    adds no gap; giving dp-accounting Opacus' orders removes the grid gap (its default adds 11 and
    128..1024, which can only lower its epsilon). What is left is the RDP at each order: at integer
    orders both sum the same finite series; at fractional ones Opacus sums the signed series of
    Mironov et al. 2019, Sec. 3.3 (exact), while dp-accounting 0.6 adds the terms' absolute values
    (its _log_comb drops the sign of binom(a, i) for i > a + 1): an upper bound. So the ledger
    lies between the exact minimum over Opacus' orders (computed here) and dp-accounting's. Slack:
    float64 and Opacus' series cut-off (terms below e^-30) move log A by under 1e-13 per step, so
    epsilon by under steps * 1e-13 / (a - 1) <= steps * 1e-12 (a >= 1.1).
    """
    orders = RDPAccountant.DEFAULT_ALPHAS
    exact = min(
        steps * _sampled_gaussian_log_moment(rate, sigma, a) / (a - 1)
        + math.log1p(-1 / a)
        - math.log(delta * a) / (a - 1)
        for a in orders
    )
    upper = dp_accounting.rdp.RdpAccountant(orders).compose(event).get_epsilon(delta)
    slack = steps * 1e-12
    return exact - slack, upper + slack


def _prv_bounds(dp_accounting, rate, sigma, steps, delta):
    """Where Opacus' PRV epsilon (the ledger's) must lie, from dp-accounting's PLD.

    With its defaults (eps_error 0.01, delta_error delta / 1000), Opacus returns est(delta -
    delta_error) + eps_error, where Gopi et al. 2021 (the bound its mesh is sized for) give
    eps(d + delta_error) - eps_error <= est(d) <= eps(d - delta_error) + eps_error for the true
    curve eps(.). Hence eps(delta) <= ledger <= eps(delta - 2 * delta_error) + 2 * eps_error.
    dp-accounting brackets eps(.): its pessimistic PLD (connect-the-dots, any interval) is >= eps,
    which gives the upper end; its optimistic one rounds each step's loss down to its grid, so it
    is <= eps (at delta + 1e-15, the tail mass its composition moves to infinite loss) and at most
    steps * interval below it. An interval of 2 * eps_error / steps keeps that lower end within
    2 * eps_error of eps(delta), as the upper end is.
    """
    eps_error = inspect.signature(PRVAccountant.get_epsilon).parameters["eps_error"].default
    delta_error = delta / 1000  # Opacus' default when delta_error is None
    pld = dp_accounting.pld.privacy_loss_distribution
    pessimistic = pld.from_gaussian_mechanism(
        sigma, value_discretization_interval=1e-3, sampling_prob=rate
    ).self_compose(steps)
    optimistic = pld.from_gaussian_mechanism(
        sigma,
        value_discretization_interval=2 * eps_error / steps,
        sampling_prob=rate,
        pessimistic_estimate=False,
        use_connect_dots=False,
    ).self_compose(steps)
    upper = pessimistic.get_epsilon_for_delta(delta - 2 * delta_error) + 2 * eps_error
    return optimistic.get_epsilon_for_delta(delta + 1e-15), upper


def _ledger(accountant="rdp", sigma=1.1, rate=0.032, epsilon=10.0, delta=1e-5):
    return SiteLedger(
        target_epsilon=epsilon,
        delta=delta,
        noise_multiplier=sigma,
        sample_rate=rate,
        num_records=1000,
        accountant=accountant,
        planned_steps=300,
    )


def test_plan_arithmetic():
    assert sample_rate(32, 571) == pytest.approx(32 / 571)
    assert sample_rate(64, 10) == 1.0
    assert steps_per_epoch(32 / 571) == 17
    assert steps_per_epoch(1.0) == 1
    assert planned_steps(20, 2, 32 / 571) == 20 * 2 * 17
    assert default_delta(571) == pytest.approx(1 / 5710)
    with pytest.raises(ValueError, match="no training records"):
        sample_rate(32, 0)


def test_opacus_reference_epsilons():
    """Opacus' numbers for sigma 1.1, q 0.032, 300 steps, delta 1e-5 (the field notes' check)."""
    assert epsilon_for(1.1, 0.032, 300, 1e-5, "rdp") == pytest.approx(3.35, abs=0.01)
    assert epsilon_for(1.1, 0.032, 300, 1e-5, "prv") == pytest.approx(2.99, abs=0.01)


def test_calibrated_noise_spends_the_budget_over_the_planned_run():
    ledger = SiteLedger.plan(
        target_epsilon=2.0,
        num_records=200,
        batch_size=20,
        rounds=3,
        local_epochs=1,
        accountant="rdp",
    )
    assert ledger.planned_steps == 30
    assert ledger.delta == pytest.approx(1 / 2000)
    assert ledger.sample_rate == pytest.approx(0.1)
    final = ledger.epsilon(extra_steps=ledger.planned_steps)
    assert 2.0 - 0.05 < final <= 2.0
    assert epsilon_for(0.97 * ledger.noise_multiplier, 0.1, 30, ledger.delta, "rdp") > 2.0


def test_spending_across_rounds_accumulates_and_stops_at_the_budget():
    ledger = _ledger(epsilon=3.0)
    assert ledger.epsilon() == 0.0
    assert ledger.can_afford(100)
    ledger.spend(100)
    first = ledger.epsilon()
    ledger.spend(100)
    assert ledger.steps == 200
    assert ledger.history == [(1.1, 0.032, 200)]
    assert ledger.epsilon() > first
    assert ledger.epsilon() == pytest.approx(epsilon_for(1.1, 0.032, 200, 1e-5, "rdp"))
    assert not ledger.can_afford(100)  # 300 steps spend 3.35 > 3.0
    assert ledger.can_afford(10)


def test_round_trip_through_dict_json_file_and_flower_config_record(tmp_path):
    ledger = _ledger()
    ledger.spend(37)
    data = ledger.to_dict()
    for value in data.values():
        assert isinstance(value, (int, float, str, list))
        if isinstance(value, list):
            assert all(isinstance(item, (int, float)) for item in value)
    restored = SiteLedger.from_dict(json.loads(json.dumps(data)))
    assert restored == ledger and restored.history == ledger.history
    assert restored.epsilon() == ledger.epsilon()
    restored.spend(3)
    assert restored.history == [(1.1, 0.032, 40)]

    path = tmp_path / "privacy" / "site-0.json"
    ledger.save(path)
    assert SiteLedger.load(path).history == ledger.history

    app = pytest.importorskip("flwr.app")
    state = app.RecordDict({"privacy": app.ConfigRecord(data)})  # as in context.state
    assert SiteLedger.from_dict(state["privacy"]).history == ledger.history
    assert SiteLedger.from_dict(app.ConfigRecord(_ledger().to_dict())).steps == 0


def test_summary_has_the_summary_json_fields():
    ledger = _ledger()
    ledger.spend(300)
    summary = ledger.summary()
    assert set(summary) == {
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "accountant",
    }
    assert summary["steps"] == 300 and summary["accountant"] == "rdp"
    assert summary["epsilon"] == pytest.approx(3.35, abs=0.01)


def test_load_or_plan_keeps_the_saved_ledger_with_more_steps(tmp_path):
    privacy = {"epsilon": 10.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.1}
    train = {"batch_size": 32, "local_epochs": 1}
    fresh = load_or_plan_ledger(privacy, train, rounds=5, num_records=1000)
    assert fresh.steps == 0 and fresh.noise_multiplier == 1.1 and fresh.planned_steps == 5 * 31
    in_state = SiteLedger.from_dict(fresh.to_dict())
    in_state.spend(62)
    on_disk = SiteLedger.from_dict(fresh.to_dict())
    on_disk.spend(31)
    path = tmp_path / "ledger.json"
    on_disk.save(path)
    restored = load_or_plan_ledger(
        privacy, train, rounds=5, num_records=1000, state=in_state.to_dict(), path=path
    )
    assert restored.steps == 62
    assert load_or_plan_ledger(privacy, train, 5, 1000, path=path).steps == 31

    with pytest.raises(ValueError, match="budget changed during the run"):
        load_or_plan_ledger({**privacy, "epsilon": 4.0}, train, 5, 1000, path=path)


def _dp_optimizer(noise_multiplier):
    """Opacus' own DPOptimizer over one weight, with a batch of four per-sample gradients."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = DPOptimizer(
        torch.optim.SGD([weight], lr=0.1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        expected_batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    weight.grad_sample = torch.ones(4, 3)
    return optimizer


def test_optimizer_hook_records_each_step_of_a_dp_optimizer():
    ledger = _ledger()
    optimizer = _dp_optimizer(1.1)
    optimizer.attach_step_hook(ledger.optimizer_hook())
    optimizer.step()
    optimizer.zero_grad()
    optimizer.param_groups[0]["params"][0].grad_sample = torch.ones(4, 3)
    optimizer.step()
    assert ledger.history == [(1.1, 0.032, 2)]


def test_optimizer_hook_refuses_a_dp_optimizer_with_other_noise():
    ledger = _ledger()
    optimizer = _dp_optimizer(0.5)
    optimizer.attach_step_hook(ledger.optimizer_hook())
    with pytest.raises(ValueError, match=r"adds noise 0\.5, the ledger planned 1\.1"):
        optimizer.step()
    assert ledger.steps == 0


def test_invalid_budgets_are_refused():
    with pytest.raises(ValueError, match=r"Unknown privacy\.accountant"):
        _ledger(accountant="gdp")
    with pytest.raises(ValueError, match="must be positive"):
        _ledger(epsilon=0.0)
    with pytest.raises(ValueError, match="delta"):
        _ledger(delta=1.0)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_a_sample_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(ValueError, match=r"sample rate must be in \(0, 1\]"):
        _ledger(rate=rate)


def test_a_sample_rate_of_one_is_a_full_batch_and_accepted():
    assert _ledger(rate=1.0).sample_rate == 1.0


def test_spending_a_negative_number_of_steps_is_refused():
    ledger = _ledger()
    ledger.spend(5)
    with pytest.raises(ValueError, match="negative number of steps"):
        ledger.spend(-3)
    assert ledger.steps == 5


def test_load_or_plan_prefers_the_file_when_it_holds_more_steps(tmp_path):
    privacy = {"epsilon": 10.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.1}
    train = {"batch_size": 32, "local_epochs": 1}
    fresh = load_or_plan_ledger(privacy, train, rounds=5, num_records=1000)
    in_state = SiteLedger.from_dict(fresh.to_dict())
    in_state.spend(31)  # the node's state lost a round the file recorded
    on_disk = SiteLedger.from_dict(fresh.to_dict())
    on_disk.spend(93)
    path = tmp_path / "ledger.json"
    on_disk.save(path)
    restored = load_or_plan_ledger(
        privacy, train, rounds=5, num_records=1000, state=in_state.to_dict(), path=path
    )
    assert restored.steps == 93


BUDGET_CHANGES = {
    "num_records": 999,
    "sample_rate": 0.064,
    "delta": 1e-6,
    "accountant": "prv",
}


@pytest.mark.parametrize("changed", list(BUDGET_CHANGES))
def test_a_resumed_budget_that_changed_anything_but_epsilon_is_refused(changed):
    saved = _ledger()
    saved.spend(31)
    keys = ("target_epsilon", "delta", "accountant", "sample_rate", "num_records")
    budget = {key: saved.to_dict()[key] for key in keys}
    saved.check_same_budget(budget)
    budget[changed] = BUDGET_CHANGES[changed]
    with pytest.raises(ValueError, match=f"budget changed during the run \\({changed} [^,]*\\);"):
        saved.check_same_budget(budget)


def test_the_budget_a_config_plans_matches_its_ledger():
    privacy = {"epsilon": 10.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.1}
    train = {"batch_size": 32, "local_epochs": 1}
    ledger = load_or_plan_ledger(privacy, train, rounds=5, num_records=1000)
    ledger.check_same_budget(planned_budget(privacy, train, 1000))
    with pytest.raises(ValueError, match=r"\(sample_rate 0\.032 -> 0\.064\)"):
        ledger.check_same_budget(planned_budget(privacy, {"batch_size": 64}, 1000))


@pytest.mark.parametrize(
    ("sigma", "rate", "steps", "delta"),
    [(1.1, 0.032, 300, 1e-5), (1.0, 32 / 571, 20 * 17, 1 / 5710), (1.5, 0.01, 1000, 1e-5)],
)
def test_epsilon_agrees_with_google_dp_accounting(sigma, rate, steps, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    bounds = {
        "rdp": _rdp_bounds(dp_accounting, event, rate, sigma, steps, delta),
        "prv": _prv_bounds(dp_accounting, rate, sigma, steps, delta),
    }

    for accountant, (low, high) in bounds.items():
        ledger = _ledger(accountant=accountant, sigma=sigma, rate=rate, delta=delta)
        # Spent over several rounds and restored in between, as a site does.
        for _ in range(4):
            ledger = SiteLedger.from_dict(ledger.to_dict())
            ledger.spend(steps // 4)
        ledger.spend(steps - 4 * (steps // 4))
        assert ledger.steps == steps
        assert low <= ledger.epsilon() <= high, (accountant, low, ledger.epsilon(), high)


# The whole plan of ``_ledger()``, as ``to_dict`` writes it before any step.
PLAN = {
    "target_epsilon": 10.0,
    "delta": 1e-5,
    "noise_multiplier": 1.1,
    "sample_rate": 0.032,
    "num_records": 1000,
    "accountant": "rdp",
    "planned_steps": 300,
}


def test_the_written_record_is_the_plan_and_the_history_and_nothing_else(tmp_path):
    ledger = _ledger()
    ledger.spend(37)
    record = {
        **PLAN,
        "history_noise_multipliers": [1.1],
        "history_sample_rates": [0.032],
        "history_steps": [37],
    }
    assert ledger.to_dict() == record
    path = tmp_path / "run" / "privacy" / "site-0.json"  # folders that do not exist yet
    ledger.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == record
    ledger.spend(3)
    ledger.save(path)  # the second save replaces the first and leaves no temporary file
    assert json.loads(path.read_text(encoding="utf-8"))["history_steps"] == [40]
    assert [p.name for p in path.parent.iterdir()] == ["site-0.json"]


def test_the_summary_entry_is_the_whole_spent_budget():
    ledger = _ledger()
    ledger.spend(300)
    assert ledger.summary() == {
        "epsilon": ledger.epsilon(),
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sample_rate": 0.032,
        "steps": 300,
        "accountant": "rdp",
    }


@pytest.mark.parametrize("key", sorted(PLAN))
def test_a_saved_ledger_without_a_plan_key_is_refused_by_name(key):
    data = {k: v for k, v in PLAN.items() if k != key}
    with pytest.raises(ValueError) as err:
        SiteLedger.from_dict(data)
    assert str(err.value) == f"The saved privacy ledger lacks [{key!r}]."


def test_a_saved_ledger_without_history_has_spent_nothing():
    restored = SiteLedger.from_dict(PLAN)
    assert restored == _ledger() and restored.history == [] and restored.epsilon() == 0.0


@pytest.mark.parametrize(
    "odd", ["history_noise_multipliers", "history_sample_rates", "history_steps"]
)
def test_history_lists_of_different_lengths_are_refused(odd):
    data = {
        **PLAN,
        "history_noise_multipliers": [1.1],
        "history_sample_rates": [0.032],
        "history_steps": [37],
    }
    data[odd] = data[odd] * 2
    with pytest.raises(ValueError) as err:
        SiteLedger.from_dict(data)
    assert str(err.value) == "The saved privacy ledger's history lists differ in length."


def test_a_restored_history_is_composed_as_saved():
    data = {
        **PLAN,
        "history_noise_multipliers": [2.0, 1.1],
        "history_sample_rates": [0.064, 0.032],
        "history_steps": [10, 20],
    }
    restored = SiteLedger.from_dict(data)
    assert restored.history == [(2.0, 0.064, 10), (1.1, 0.032, 20)]
    assert restored.steps == 30


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target_epsilon": 0.0}, "privacy.epsilon must be positive, got 0.0."),
        ({"delta": 0.0}, "privacy.delta must be in (0, 1), got 0.0."),
        ({"delta": 1.0}, "privacy.delta must be in (0, 1), got 1.0."),
        ({"sample_rate": 1.5}, "The sample rate must be in (0, 1], got 1.5."),
        ({"noise_multiplier": 0.0}, "The noise multiplier must be positive, got 0.0."),
        ({"noise_multiplier": -1.0}, "The noise multiplier must be positive, got -1.0."),
        ({"noise_multiplier": math.inf}, "The noise multiplier must be positive, got inf."),
        ({"noise_multiplier": math.nan}, "The noise multiplier must be positive, got nan."),
    ],
)
def test_a_budget_out_of_range_is_refused_in_one_sentence(changes, message):
    with pytest.raises(ValueError) as err:
        SiteLedger(**(PLAN | changes))
    assert str(err.value) == message


def test_an_epsilon_and_a_noise_multiplier_below_one_are_accepted():
    ledger = SiteLedger(**(PLAN | {"target_epsilon": 0.5, "noise_multiplier": 0.5}))
    assert (ledger.target_epsilon, ledger.noise_multiplier) == (0.5, 0.5)


def test_spending_no_steps_spends_nothing():
    ledger = _ledger()
    ledger.spend(0)
    assert ledger.history == [] and ledger.epsilon() == 0.0
    with pytest.raises(ValueError) as err:
        ledger.spend(-3)
    assert str(err.value) == "Cannot spend a negative number of steps (-3)."


def test_a_round_that_spends_exactly_the_budget_is_affordable():
    exact = _ledger().epsilon(extra_steps=300)
    ledger = _ledger(epsilon=exact)
    assert ledger.can_afford(300)
    assert not ledger.can_afford(301)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_epsilon_of_steps_ahead_is_the_epsilon_once_they_are_spent(accountant):
    ledger = _ledger(accountant=accountant)
    ledger.spend(40)
    ahead = ledger.epsilon(extra_steps=60)
    ledger.spend(60)
    assert ledger.epsilon() == ahead
    # After a resume at other noise, the steps ahead are composed after the saved ones.
    data = ledger.to_dict() | {"noise_multiplier": 1.3}
    resumed = SiteLedger.from_dict(data)
    ahead = resumed.epsilon(extra_steps=25)
    resumed.spend(25)
    assert resumed.history == [(1.1, 0.032, 100), (1.3, 0.032, 25)]
    assert resumed.epsilon() == ahead


def test_steps_per_round_are_local_epochs_times_the_steps_of_an_epoch():
    assert _ledger().steps_per_round(2) == 2 * 31


def test_the_optimizer_hook_refusal_names_both_noise_multipliers():
    ledger = _ledger()
    optimizer = _dp_optimizer(0.5)
    optimizer.attach_step_hook(ledger.optimizer_hook())
    with pytest.raises(ValueError) as err:
        optimizer.step()
    assert str(err.value) == "The optimizer adds noise 0.5, the ledger planned 1.1."


def test_the_refusal_of_a_changed_budget_names_every_change_and_the_remedy():
    saved = _ledger()
    budget = {"target_epsilon": 10.0, "delta": 1e-6, "accountant": "prv", "sample_rate": 0.032}
    budget["num_records"] = 1000
    with pytest.raises(ValueError) as err:
        saved.check_same_budget(budget)
    assert str(err.value) == (
        "This site's privacy budget changed during the run (delta 1e-05 -> 1e-06, accountant "
        "rdp -> prv); a ledger cannot be restarted mid-run. Start a new run (new output_dir) "
        "instead."
    )


def _calibration_spy(monkeypatch):
    asked = []

    def calibrated(*args):
        asked.append(args)
        return 0.9

    monkeypatch.setattr(ledger_module, "noise_multiplier_for", calibrated)
    return asked


def test_a_config_with_every_setting_plans_exactly_those(monkeypatch):
    asked = _calibration_spy(monkeypatch)
    # delta 2e-4, not the default 1 / (10 * 100) = 1e-3.
    privacy = {"epsilon": 3, "delta": 2e-4, "accountant": "rdp", "noise_multiplier": 0.8}
    train = {"batch_size": 10, "local_epochs": 3}
    ledger = SiteLedger.from_config(privacy, train, rounds=2, num_records=100)
    assert ledger.to_dict() == {
        "target_epsilon": 3.0,
        "delta": 2e-4,
        "noise_multiplier": 0.8,
        "sample_rate": 0.1,
        "num_records": 100,
        "accountant": "rdp",
        "planned_steps": 2 * 3 * 10,
        "history_noise_multipliers": [],
        "history_sample_rates": [],
        "history_steps": [],
    }
    assert asked == []  # a fixed noise multiplier is not calibrated
    assert planned_budget(privacy, train, 100) == {
        "target_epsilon": 3.0,
        "delta": 2e-4,
        "accountant": "rdp",
        "sample_rate": 0.1,
        "num_records": 100,
    }


def test_a_config_without_the_optional_settings_plans_the_defaults(monkeypatch):
    asked = _calibration_spy(monkeypatch)
    privacy = {"epsilon": 3.0, "delta": None, "noise_multiplier": None}
    train = {"batch_size": 10, "local_epochs": 3}
    ledger = SiteLedger.from_config(privacy, train, rounds=2, num_records=100)
    assert (ledger.delta, ledger.accountant, ledger.noise_multiplier) == (1e-3, "prv", 0.9)
    assert asked == [(3.0, 1e-3, 0.1, 60, "prv")]  # calibrated for the whole planned run
    assert planned_budget({"epsilon": 3.0}, train, 100) == {
        "target_epsilon": 3.0,
        "delta": 1e-3,
        "accountant": "prv",
        "sample_rate": 0.1,
        "num_records": 100,
    }
    plain = SiteLedger.plan(
        target_epsilon=3.0, num_records=100, batch_size=10, rounds=2, local_epochs=3
    )
    assert (plain.delta, plain.accountant, plain.noise_multiplier) == (1e-3, "prv", 0.9)
    with pytest.raises(ValueError, match=r"Unknown privacy\.accountant 'gdp'"):
        planned_budget({"epsilon": 3.0, "accountant": "gdp"}, train, 100)


def test_load_or_plan_takes_the_node_state_alone_and_plans_when_nothing_is_saved(tmp_path):
    privacy = {"epsilon": 10.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.1}
    train = {"batch_size": 32, "local_epochs": 1}
    saved = load_or_plan_ledger(privacy, train, rounds=5, num_records=1000)
    saved.spend(31)
    from_state = load_or_plan_ledger(privacy, train, 5, 1000, state=saved.to_dict())
    assert from_state.history == [(1.1, 0.032, 31)]
    missing_file = tmp_path / "ledger.json"
    fresh = load_or_plan_ledger(privacy, train, 5, 1000, state={}, path=missing_file)
    assert fresh.steps == 0 and fresh.planned_steps == 5 * 31
