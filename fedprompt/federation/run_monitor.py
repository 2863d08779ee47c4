"""End of each round: central evaluation, one metrics line, progress on the terminal, checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fedprompt.evaluation.metrics import ClassificationMetrics
from fedprompt.federation.metered_grid import MeteredGrid, SiteTraffic
from fedprompt.results import ResultsFolder

CentralEvaluation = Callable[[ArrayRecord], ClassificationMetrics]


def _weighted(values: Sequence[tuple[float, float]]) -> float | None:
    """Mean of ``(value, weight)`` pairs, or None when there is no weight."""
    total = sum(weight for _, weight in values)
    return sum(value * weight for value, weight in values) / total if total else None


def _site_line(traffic: SiteTraffic) -> dict[str, Any]:
    return {
        "train_loss": traffic.train.get("train-loss"),
        "num_train": traffic.train.get("num-examples"),
        "accuracy": traffic.evaluate.get("accuracy"),
        "balanced_accuracy": traffic.evaluate.get("balanced-accuracy"),
        "macro_f1": traffic.evaluate.get("macro-f1"),
        "num_test": traffic.evaluate.get("num-examples"),
        "bytes_up": traffic.bytes_up,
        "bytes_down": traffic.bytes_down,
        "errors": traffic.errors,
    }


def _kb(num_bytes: float) -> str:
    return f"{num_bytes / 1024:.1f} kB"


class RunMonitor:
    """The strategy's ``evaluate_fn``: Flower calls it before round 1 and after every round."""

    def __init__(
        self,
        results: ResultsFolder,
        grid: MeteredGrid,
        site_names: Sequence[str],
        num_rounds: int,
        central: CentralEvaluation | None,
    ) -> None:
        self.results = results
        self.grid = grid
        self.site_names = list(site_names)
        self.num_rounds = num_rounds
        self.central = central
        self.initial: dict[str, Any] | None = None
        self.lines: list[dict[str, Any]] = []
        self._round_start = time.perf_counter()

    def _name(self, node_id: int, traffic: SiteTraffic) -> str:
        index = traffic.train.get("site-index", traffic.evaluate.get("site-index"))
        return self.site_names[int(index)] if index is not None else f"node-{node_id}"

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate centrally, write the round's line, checkpoint, and print progress."""
        central = self.central(arrays).as_dict() if self.central else None
        if server_round == 0:
            self.initial = central
            self._round_start = time.perf_counter()
            if central:
                log(
                    INFO,
                    "[fedprompt] before training: central accuracy %.1f%%",
                    100 * central["accuracy"],
                )
            return MetricRecord(central) if central else None
        sites = {
            self._name(node_id, traffic): _site_line(traffic)
            for node_id, traffic in sorted(self.grid.take_round().items())
        }
        evaluated = [s for s in sites.values() if s["accuracy"] is not None]
        trained = [s for s in sites.values() if s["train_loss"] is not None]
        line = {
            "round": server_round,
            "seconds": time.perf_counter() - self._round_start,
            "train_loss": _weighted([(s["train_loss"], s["num_train"]) for s in trained]),
            "federated_accuracy": _weighted([(s["accuracy"], s["num_test"]) for s in evaluated]),
            "central": central,
            "bytes_up": sum(s["bytes_up"] for s in sites.values()),
            "bytes_down": sum(s["bytes_down"] for s in sites.values()),
            "sites": dict(sorted(sites.items())),
        }
        self.results.append_metrics(line)
        self.results.save_state(arrays.to_torch_state_dict())
        self.lines.append(line)
        self._log(line, len(trained))
        self._round_start = time.perf_counter()
        return MetricRecord(central) if central else None

    def _log(self, line: dict[str, Any], num_trained: int) -> None:
        parts = [f"[fedprompt] round {line['round']}/{self.num_rounds}"]
        if line["train_loss"] is not None:
            parts.append(f"train loss {line['train_loss']:.4f} ({num_trained} sites)")
        if line["federated_accuracy"] is not None:
            parts.append(f"federated acc {100 * line['federated_accuracy']:.1f}%")
        if line["central"]:
            parts.append(f"central acc {100 * line['central']['accuracy']:.1f}%")
        parts.append(f"{line['seconds']:.1f} s")
        parts.append(f"up {_kb(line['bytes_up'])} down {_kb(line['bytes_down'])}")
        log(INFO, " | ".join(parts))
