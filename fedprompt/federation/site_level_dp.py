"""Site-level DP (``privacy=site_level``) through Flower's fixed-clipping DP strategy wrappers.

Each site's update (its prompt minus the global one) is clipped to ``clipping_norm`` in L2, and
Gaussian noise of std ``noise_multiplier * clipping_norm / sites`` is added to the average
(McMahan et al., ICLR 2018). The unit protected is a whole site: the released prompt bounds what
anyone learns about a hospital's entire contribution (and so about every record in it). But the
server is trusted: it sees each update before the noise. Sample-level DP-SGD
(``privacy=dpsgd``) protects records from the server too, and is the guarantee to report per
patient.

``side=server``: the server clips the updates it receives (it sees them unclipped);
``side=client``: each site clips before sending (``site_level_clipping_mod``). The epsilon is
accounted by Flower's RDP accountant over the sites, without amplification by sampling, which
needs an unweighted average: every site weighs the same (``SITE_WEIGHT_KEY``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedprompt.config import ConfigError

SITE_WEIGHT_KEY = "site-weight"
"""The metric every site sends as 1 under site-level DP, by which the average is weighted."""

SIDES = ("server", "client")

SiteLevelStrategy = (
    DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping
)


def site_level_clipping_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower's ``fixedclipping_mod`` on train instructions that carry a clipping norm.

    Installed on every fedprompt ClientApp: it clips only where the server's client-side DP
    wrapper asked for it, and passes every other message through unchanged.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    configs = list(msg.content.config_records.values())
    if len(configs) != 1 or KEY_CLIPPING_NORM not in configs[0]:
        return call_next(msg, context)
    return fixedclipping_mod(msg, context, call_next)


def wrap_site_level(
    strategy: Strategy, privacy_cfg: Mapping[str, Any], num_sites: int
) -> SiteLevelStrategy:
    """``strategy`` inside Flower's fixed-clipping DP wrapper for the ``privacy`` section.

    Raises:
        ConfigError: An unknown side, a non-positive setting, or a strategy whose aggregation
            the accountant cannot follow (it needs FedAvg's or FedProx's plain average).
    """
    side = str(privacy_cfg.get("side", "server"))
    if side not in SIDES:
        raise ConfigError(f"privacy.side is {side!r}; use server or client.")
    noise = float(privacy_cfg["noise_multiplier"])
    clipping_norm = float(privacy_cfg["clipping_norm"])
    delta = float(privacy_cfg.get("delta", 1e-5))
    if noise <= 0 or clipping_norm <= 0:
        raise ConfigError(
            "privacy.noise_multiplier and privacy.clipping_norm must be positive under "
            f"privacy=site_level (got {noise} and {clipping_norm})."
        )
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if side == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    try:
        return wrapper(strategy, noise, clipping_norm, num_sites, accountant=accountant)
    except ValueError as err:
        raise ConfigError(
            f"privacy=site_level cannot wrap strategy {type(strategy).__name__} ({err}); use "
            "strategy=fedavg or strategy=fedprox."
        ) from err


def site_level_spent(strategy: SiteLevelStrategy) -> dict[str, float | int | str]:
    """The whole run's site-level epsilon so far, for ``metrics.jsonl`` and ``summary.json``."""
    spent = strategy.privacy_spent()
    assert spent is not None
    return {
        "guarantee": "site-level",
        "epsilon": float(spent.epsilon),
        "delta": float(spent.delta),
        "noise_multiplier": float(strategy.noise_multiplier),
        "clipping_norm": float(strategy.clipping_norm),
        "releases": int(spent.num_releases),
        "accountant": f"flwr-{spent.accounting_method}",
    }


def replay_releases(strategy: SiteLevelStrategy, releases: int) -> None:
    """Compose the releases of the rounds before a resume into the fresh accountant."""
    accountant = strategy.accountant
    if accountant is None or releases <= 0:
        return
    event = GaussianPrivacyEvent(
        noise_multiplier=strategy.noise_multiplier,
        sample_size=strategy.num_sampled_clients,
        population_size=accountant.config.population_size,
    )
    accountant.compose(event, count=releases)
