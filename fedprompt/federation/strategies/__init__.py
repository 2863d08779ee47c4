"""The aggregation rules a run chooses with ``strategy=``: Flower's strategies, configured.

``configs/strategy/<name>.yaml`` holds each one's settings; everything but ``name`` is passed to
the strategy's constructor. FedProx's proximal term is applied by the sites
(``training.ProximalTerm``) from the ``proximal-mu`` the strategy sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg

from fedprompt.config import ConfigError
from fedprompt.federation.strategies.fedadam import FedAdam

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "trimmed_mean": FedTrimmedAvg,
}


def build_strategy(
    strategy_cfg: Mapping[str, Any],
    *,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
    min_nodes: int = 1,
    min_available_nodes: int = 1,
    weighted_by_key: str = "num-examples",
) -> FedAvg:
    """The configured strategy, sampling ``fraction_*`` of the connected sites each round.

    Sites' tensors and metrics are averaged with the weights the sites report under
    ``weighted_by_key`` (their number of images unless a privacy mode needs otherwise).

    Raises:
        ConfigError: An unknown strategy name or setting.
    """
    params = dict(strategy_cfg)
    name = str(params.pop("name"))
    if name not in STRATEGIES:
        raise ConfigError(
            f"Unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}."
        )
    try:
        return STRATEGIES[name](
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            **params,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"Strategy {name} cannot take the settings {sorted(params)} ({err}); compare "
            f"configs/strategy/{name}.yaml."
        ) from err
