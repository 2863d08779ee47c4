"""End of each round: central evaluation, one metrics line, progress on the terminal, checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedprompt.evaluation.metrics import BaseToNovelMetrics, ClassificationMetrics
from fedprompt.federation.checkpoint import save_checkpoint
from fedprompt.federation.metered_grid import MeteredGrid, RoundTraffic, SiteTraffic
from fedprompt.federation.site_scores import SiteClasses, per_class, shared_reliability
from fedprompt.results import ResultsFolder

CentralEvaluation = Callable[[ArrayRecord], ClassificationMetrics | BaseToNovelMetrics]


class RunFailed(RuntimeError):
    """The run cannot do what was asked; the message is one sentence saying why."""


def _why_nothing_was_aggregated(line: dict[str, Any]) -> str:
    """The sites that did not contribute to a round, and why, in a few words each."""
    reasons = [
        f"{site} {kind}: {reason.split('; ')[0]}"
        for kind in ("missing", "rejected", "withheld")
        for site, reason in line[kind].items()
    ]
    return "; ".join(reasons[:4]) + ("; ..." if len(reasons) > 4 else "") or "no site was asked"


def _weighted(values: Sequence[tuple[float, float]]) -> float | None:
    """Mean of ``(value, weight)`` pairs, or None when there is no weight."""
    total = sum(weight for _, weight in values)
    return sum(value * weight for value, weight in values) / total if total else None


DP_LINE_KEYS = {
    f"dp_{key}": f"dp-{key.replace('_', '-')}"
    for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps")
}
"""The privacy a DP-SGD site reports each round: its key in a site's line -> the metric sent."""


def _site_line(traffic: SiteTraffic, num_classes: int) -> dict[str, Any]:
    """A site's entry in the round's line; per-class lists by class id, ``num_classes`` long."""
    rejected_train = any(r.startswith("update") for r in traffic.rejected)
    rejected_evaluate = any(r.startswith("evaluation") for r in traffic.rejected)
    train = {} if rejected_train else traffic.train
    evaluate = {} if rejected_evaluate else traffic.evaluate
    line = {
        "train_loss": train.get("train-loss"),
        "num_train": train.get("num-examples"),
        "accuracy": evaluate.get("accuracy"),
        "balanced_accuracy": evaluate.get("balanced-accuracy"),
        "macro_f1": evaluate.get("macro-f1"),
        "num_test": evaluate.get("num-examples"),
        "mia_auc": evaluate.get("mia-auc"),
        "personalized_accuracy": evaluate.get("personalized-accuracy"),
        "ece": evaluate.get("ece"),
        "brier": evaluate.get("brier"),
    }
    scores = per_class(evaluate, num_classes) or {}
    line["sensitivity"] = scores.get("sensitivity")
    line["specificity"] = scores.get("specificity")
    bins = shared_reliability(evaluate)
    line["reliability"] = None if bins is None else bins.as_dict()
    line.update({key: train.get(metric) for key, metric in DP_LINE_KEYS.items()})
    line.update(
        {
            "bytes_up": traffic.bytes_up,
            "bytes_down": traffic.bytes_down,
            "errors": traffic.errors,
            "rejected": traffic.rejected,
            "withheld": traffic.withheld,
        }
    )
    return line


def _scalars(central: dict[str, Any]) -> MetricRecord:
    """The central metrics Flower keeps: the scalars (per-class lists and bins stay in the line)."""
    return MetricRecord(
        {key: value for key, value in central.items() if isinstance(value, (int, float))}
    )


def _kb(num_bytes: float) -> str:
    return f"{num_bytes / 1024:.1f} kB"


class RunMonitor:
    """The strategy's ``evaluate_fn``: Flower calls it before round 1 and after every round.

    Args:
        results: The run's results folder.
        grid: The metered grid whose per-round traffic becomes the metrics line.
        num_rounds: The run's last round, for progress lines.
        central: Evaluation of the global prompt on a central test split, where there is one.
        strategy: The strategy whose state goes into each round's checkpoint.
        lines: The lines of rounds already run (a resumed run continues them).
        round_offset: Rounds completed before this session started (a resumed run).
        initial: Central metrics before round 1, as a resumed run's checkpoint kept them.
        site_level_privacy: The run's site-level epsilon so far (``privacy=site_level``), for
            each round's line.
        roster: The sites expected in every round (deployment: ``federation.sites``, the names
            the centre registered); one that is not connected when a round starts is missing.
        dataset: What the sites train on, in every line (``synthetic-<name>`` for the generated
            stand-in, so no line can be mistaken for a result on real images).
        held_out: The sites kept out of training (``evaluation.holdout_sites``): their scores
            make the line's ``unseen_site_accuracy`` and stay out of ``federated_accuracy``.
        unseen_datasets: Accuracy of the global prompt on each dataset no site holds
            (``evaluation.unseen_datasets``), for the line's ``unseen_datasets``.
        site_classes: The class names each site scores, by its name: the length of the lists
            of its per-class sensitivity and specificity in each line (none without it).
    """

    def __init__(
        self,
        results: ResultsFolder,
        grid: MeteredGrid,
        num_rounds: int,
        central: CentralEvaluation | None,
        strategy: Strategy,
        lines: Sequence[dict[str, Any]] = (),
        round_offset: int = 0,
        initial: dict[str, Any] | None = None,
        site_level_privacy: Callable[[], dict[str, Any]] | None = None,
        roster: Sequence[str] = (),
        dataset: str = "",
        held_out: Sequence[str] = (),
        unseen_datasets: Callable[[ArrayRecord], dict[str, float]] | None = None,
        site_classes: SiteClasses | None = None,
    ) -> None:
        self.results = results
        self.grid = grid
        self.num_rounds = num_rounds
        self.central = central
        self.strategy = strategy
        self.lines: list[dict[str, Any]] = list(lines)
        self.round_offset = round_offset
        self.initial = initial
        self.site_level_privacy = site_level_privacy
        self.roster = list(roster)
        self.dataset = dataset
        self.held_out = list(held_out)
        self.unseen_datasets = unseen_datasets
        self.site_classes = site_classes
        self._known: set[int] = set()
        self._round_start = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate centrally, write the round's line, checkpoint, and print progress."""
        if server_round == 0:
            self._round_start = time.perf_counter()
            if self.round_offset:
                return None
            self.initial = self.central(arrays).as_dict() if self.central else None
            if self.initial:
                log(
                    INFO,
                    "[fedprompt] before training: central accuracy %.1f%%",
                    100 * self.initial["accuracy"],
                )
            return _scalars(self.initial) if self.initial else None
        run_round = server_round + self.round_offset
        central = self.central(arrays).as_dict() if self.central else None
        line = self._line(run_round, self.grid.take_round(), central)
        line["unseen_datasets"] = self.unseen_datasets(arrays) if self.unseen_datasets else None
        self.results.append_metrics(line)
        self.results.save_state(arrays.to_torch_state_dict())
        save_checkpoint(self.results, run_round, arrays, self.strategy, self.initial)
        self.lines.append(line)
        self._log(line)
        self._round_start = time.perf_counter()
        if line["num_trained"] == 0:
            raise RunFailed(
                f"Round {run_round} aggregated no site's update, so the prompt did not train "
                f"({_why_nothing_was_aggregated(line)})."
            )
        return _scalars(central) if central else None

    def _line(
        self, run_round: int, traffic: RoundTraffic, central: dict[str, Any] | None
    ) -> dict[str, Any]:
        name = self.grid.sites.name
        classes = self.site_classes
        sites = {
            name(node): _site_line(t, len(classes(name(node))) if classes else 0)
            for node, t in traffic.nodes.items()
        }
        missing = {
            name(node): "; ".join(dict.fromkeys(t.errors))
            for node, t in traffic.nodes.items()
            if not t.complete
        }
        # A site seen in an earlier round that is neither connected nor asked now has gone.
        for node in sorted(self._known - traffic.connected - set(traffic.nodes)):
            missing[name(node)] = "not connected"
        self._known |= traffic.connected | set(traffic.nodes)
        seen = {name(node) for node in self._known}
        for site in self.roster:
            if site not in seen:
                missing[site] = "not connected when the round started"
        rejected = {
            name(node): "; ".join(t.rejected) for node, t in traffic.nodes.items() if t.rejected
        }
        withheld = {
            name(node): "; ".join(t.withheld) for node, t in traffic.nodes.items() if t.withheld
        }
        aggregated = {
            name(node): t.aggregated
            for node, t in traffic.nodes.items()
            if t.aggregated is not None
        }
        scored = {site: s for site, s in sites.items() if s["accuracy"] is not None}
        evaluated = [s for site, s in scored.items() if site not in self.held_out]
        unseen = [s for site, s in scored.items() if site in self.held_out]
        trained = [s for site, s in sites.items() if site in aggregated]
        losses = [(s["train_loss"], s["num_train"]) for s in trained if s["train_loss"] is not None]
        return {
            "round": run_round,
            "dataset": self.dataset,
            "seconds": time.perf_counter() - self._round_start,
            "train_loss": _weighted(losses),
            "federated_accuracy": _weighted([(s["accuracy"], s["num_test"]) for s in evaluated]),
            "personalized_accuracy": _weighted(
                [
                    (s["personalized_accuracy"], s["num_test"])
                    for s in evaluated
                    if s["personalized_accuracy"] is not None
                ]
            ),
            "unseen_site_accuracy": _weighted([(s["accuracy"], s["num_test"]) for s in unseen]),
            "held_out": sorted(self.held_out),
            "central": central,
            "bytes_up": sum(s["bytes_up"] for s in sites.values()),
            "bytes_down": sum(s["bytes_down"] for s in sites.values()),
            "num_trained": len(aggregated),
            "aggregated": dict(sorted(aggregated.items())),
            "missing": dict(sorted(missing.items())),
            "rejected": dict(sorted(rejected.items())),
            "withheld": dict(sorted(withheld.items())),
            "no_test_images": sorted(site for site, s in sites.items() if s["num_test"] == 0),
            "site_level_privacy": self.site_level_privacy() if self.site_level_privacy else None,
            "sites": dict(sorted(sites.items())),
        }

    def _log(self, line: dict[str, Any]) -> None:
        parts = [f"[fedprompt] round {line['round']}/{self.num_rounds}"]
        if line["dataset"].startswith("synthetic-"):
            parts.append(f"data {line['dataset']} (generated)")
        if line["train_loss"] is not None:
            parts.append(f"train loss {line['train_loss']:.4f} ({line['num_trained']} sites)")
        else:
            parts.append(f"{line['num_trained']} sites trained")
        if line["federated_accuracy"] is not None:
            parts.append(f"federated acc {100 * line['federated_accuracy']:.1f}%")
        if line["personalized_accuracy"] is not None:
            parts.append(f"personalized acc {100 * line['personalized_accuracy']:.1f}%")
        if line["unseen_site_accuracy"] is not None:
            parts.append(f"unseen-site acc {100 * line['unseen_site_accuracy']:.1f}%")
        for name, accuracy in (line["unseen_datasets"] or {}).items():
            parts.append(f"unseen {name} acc {100 * accuracy:.1f}%")
        if line["central"]:
            parts.append(f"central acc {100 * line['central']['accuracy']:.1f}%")
            if "harmonic_mean" in line["central"]:
                parts.append(
                    f"novel acc {100 * line['central']['novel_accuracy']:.1f}% "
                    f"HM {100 * line['central']['harmonic_mean']:.1f}%"
                )
        parts.append(f"{line['seconds']:.1f} s")
        parts.append(f"up {_kb(line['bytes_up'])} down {_kb(line['bytes_down'])}")
        if line["missing"]:
            parts.append(f"missing {', '.join(line['missing'])}")
        if line["rejected"]:
            parts.append(f"rejected {', '.join(line['rejected'])}")
        left_out = [site for site in line["withheld"] if site not in self.held_out]
        if left_out:
            parts.append(f"left out {', '.join(left_out)}")
        if line["no_test_images"]:
            parts.append(f"no test images at {', '.join(line['no_test_images'])}")
        epsilons = [s["dp_epsilon"] for s in line["sites"].values() if s["dp_epsilon"] is not None]
        if epsilons:
            parts.append(f"dp epsilon up to {max(epsilons):.2f}")
        if line["site_level_privacy"]:
            parts.append(f"site-level epsilon {line['site_level_privacy']['epsilon']:.2f}")
        log(INFO, " | ".join(parts))
        for site, reason in line["missing"].items():
            log(WARNING, "[fedprompt] round %d: %s is missing: %s", line["round"], site, reason)
