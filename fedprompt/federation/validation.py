"""Update validation before aggregation, as a strategy wrapper (the way Flower wraps for DP).

A site's reply is rejected, with a logged reason naming the site, when its tensors have other
keys, shapes or dtypes than the global prompt, hold NaN or Inf, or moved the prompt much farther
than the other sites' did; likewise a reply whose metrics are malformed. The round goes on with
the replies that pass. An evaluation from a site without test images is kept out of the average
without being rejected. Replies are handed to the wrapped strategy in site order, so the aggregate
does not depend on the order replies arrived in (floating-point sums are order-sensitive) and a
resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprompt.federation.site_scores import detail_problem, varies_by_site

Rejection = Callable[[int, str, str], None]
"""Called as ``(node_id, message_type, reason)`` for each rejected reply."""

Withholding = Callable[[int, str], None]
"""Called as ``(node_id, reason)`` for each sound update left out of the aggregate."""

Aggregation = Callable[[int, int], None]
"""Called as ``(node_id, weight)`` for each update handed to the aggregation rule."""

BUDGET_EXHAUSTED_KEY = "dp-budget-exhausted"
"""Set to 1 by a DP-SGD site whose next round would exceed its privacy budget."""
HELD_OUT_KEY = "held-out"
"""The train-reply metric of a held-out site (``evaluation.holdout_sites``): it did not train."""


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metrics_problem(reply: Message, weighted_by_key: str, allow_zero: bool = False) -> str | None:
    """Why a reply's metrics cannot be aggregated, or None when they can.

    ``allow_zero`` accepts a weight of 0, for a reply that is recorded but never averaged.
    """
    if len(reply.content.metric_records) != 1:
        return (
            f"it carries {len(reply.content.metric_records)} metric records where a reply "
            "carries exactly one"
        )
    metrics = next(iter(reply.content.metric_records.values()))
    weight = metrics.get(weighted_by_key)
    if not _finite_number(weight) or weight < 0 or (weight == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        return f"its {weighted_by_key!r} is {weight!r}, not {kind} number"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(_finite_number(v) for v in values):
            return f"its metric {key!r} is {value!r}, not a finite number"
    return None


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()))


def _averageable(reply: Message) -> Message:
    """The reply as Flower's averaging gets it: without the keys that vary by site.

    A site's per-class values depend on which classes its test set holds, and Flower averages
    only replies with equal key sets; the sites' own values stay in the round's line. The reply
    itself is left as it came.
    """
    name, record = next(iter(reply.content.metric_records.items()))
    kept = MetricRecord({key: value for key, value in record.items() if not varies_by_site(key)})
    return Message(metadata=reply.metadata, content=RecordDict({name: kept}))


def _without_test_images(reply: Message) -> bool:
    """Whether an evaluation reply says its site holds no test images (``num-examples`` 0)."""
    records = reply.content.metric_records
    count = next(iter(records.values())).get("num-examples") if len(records) == 1 else None
    return _finite_number(count) and count == 0


class UpdateValidation(Strategy):
    """Screens every train and evaluate reply, then hands the good ones to ``strategy``.

    Args:
        strategy: The strategy that configures rounds and aggregates.
        reference: The global trainable tensors; replies must match their keys, shapes and
            dtypes.
        max_update_ratio: A site whose update (its tensors minus the global ones) has a norm above
            this multiple of the median of the other sites' update norms is rejected.
        site_name: The site's name for a node id, for logs and for the site order.
        on_reject: Told of each rejection (the metered grid records it in the round's line).
        weighted_by_key: The metric that weights aggregation; must be a positive number.
        on_withhold: Told of each sound update left out: a DP-SGD site whose privacy budget is
            spent trains no more and says so (``BUDGET_EXHAUSTED_KEY``); its reply carries the
            unchanged global prompt, which must not count as a site's vote.
        on_aggregate: Told of each update that enters the aggregate, with its weight.
        secure_sum: The replies carry one securely aggregated sum (SecAgg+), not each site's
            update: no update can be left out of it afterwards, so rejecting any reply discards
            the round's aggregate, and norms are not compared (every reply holds the same sum).
        held_out: The sites held out of training (``evaluation.holdout_sites``): their train
            replies say so and carry nothing else; they are left out, and the same claim from
            any other site is rejected.
        share_histograms: The run asks the sites for their per-bin counts
            (``evaluation.share_site_histograms``); otherwise an evaluation carrying them is
            rejected, so they are never recorded.
        num_classes: The size of a site's class list, by its name; a per-class metric naming a
            class beyond it is rejected (None: not checked).
    """

    def __init__(
        self,
        strategy: Strategy,
        reference: ArrayRecord,
        max_update_ratio: float = 10.0,
        site_name: Callable[[int], str] = lambda node_id: f"node-{node_id}",
        on_reject: Rejection | None = None,
        weighted_by_key: str = "num-examples",
        on_withhold: Withholding | None = None,
        on_aggregate: Aggregation | None = None,
        secure_sum: bool = False,
        held_out: Collection[str] = (),
        share_histograms: bool = False,
        num_classes: Callable[[str], int] | None = None,
    ) -> None:
        self.strategy = strategy
        self.share_histograms = share_histograms
        self.num_classes = num_classes
        self.held_out = frozenset(held_out)
        self.on_withhold = on_withhold
        self.on_aggregate = on_aggregate
        self.secure_sum = secure_sum
        self.expected = {
            key: (tuple(array.shape), np.dtype(array.dtype)) for key, array in reference.items()
        }
        self.max_update_ratio = max_update_ratio
        self.site_name = site_name
        self.on_reject = on_reject
        self.weighted_by_key = weighted_by_key
        self._current = {key: array.numpy() for key, array in reference.items()}

    def summary(self) -> None:
        """Log the validation settings, then the wrapped strategy's."""
        log(INFO, "\t├──> Update validation: keys, shapes, dtypes, finite values, metrics;")
        if self.secure_sum:
            log(INFO, "\t│\t└── SecAgg+: checks apply to the sum; per-site norms are hidden")
        else:
            log(
                INFO,
                "\t│\t└── update norm at most %s x the other sites' median",
                self.max_update_ratio,
            )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global tensors the updates are measured from; delegate."""
        self._current = {key: array.numpy() for key, array in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies that pass every check, in site order."""
        replies = self._without_held_out_sites(server_round, list(replies))
        failed = [reply for reply in replies if reply.has_error()]
        passed: dict[int, dict[str, np.ndarray]] = {}
        for reply in replies:
            if reply.has_error():
                continue
            arrays, reason = self._tensors(reply)
            reason = reason or metrics_problem(reply, self.weighted_by_key)
            if reason:
                self._reject(server_round, reply, reason)
            else:
                passed[id(reply)] = arrays
        kept = self._consistent_metrics(
            server_round, [reply for reply in replies if id(reply) in passed]
        )
        if self.secure_sum and len(kept) < len(replies) - len(failed):
            for reply in kept:
                self._reject(
                    server_round,
                    reply,
                    "the secure sum it is part of includes a rejected reply, so the round's "
                    "aggregate is discarded",
                )
            kept = []
        kept = self._without_exhausted_budgets(server_round, kept)
        if not self.secure_sum:
            kept = self._plausible_norms(server_round, kept, passed)
        ordered = self._in_site_order(kept)
        if self.on_aggregate is not None:
            for reply in ordered:
                metrics = next(iter(reply.content.metric_records.values()))
                self.on_aggregate(reply.metadata.src_node_id, int(metrics["num-examples"]))
        return self.strategy.aggregate_train(server_round, ordered + failed)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluation replies whose metrics pass, in site order.

        A site without test images (``num-examples`` 0) is neither rejected nor averaged: its
        weight would be 0 (and the only one, a division by zero), its scores absent. Nor is a
        held-out site averaged: its scores are the unseen-site accuracy, recorded on their own
        (and it has no personalized prompt to score). Per-class values and bin counts are
        checked (``site_scores.detail_problem``) and left out of the averaging.
        """
        replies = list(replies)
        failed = [reply for reply in replies if reply.has_error()]
        passed = []
        for reply in replies:
            if reply.has_error():
                continue
            untested = _without_test_images(reply)
            reason = metrics_problem(reply, self.weighted_by_key, allow_zero=untested)
            if not reason:
                classes = self.num_classes
                reason = detail_problem(
                    _metrics(reply),
                    self.share_histograms,
                    classes(self.site_name(reply.metadata.src_node_id)) if classes else None,
                )
            if not reason and reply.content.array_records:
                reason = "an evaluation reply carries tensors; it must carry metrics only"
            if reason:
                self._reject(server_round, reply, reason)
            elif untested:
                log(
                    INFO,
                    "[fedprompt] round %d: %s holds no test images; its evaluation is recorded, "
                    "not averaged",
                    server_round,
                    self.site_name(reply.metadata.src_node_id),
                )
            elif self.site_name(reply.metadata.src_node_id) in self.held_out:
                continue  # an unseen site's scores are its own line item, not the sites' mean
            else:
                passed.append(reply)
        kept = [_averageable(reply) for reply in self._consistent_metrics(server_round, passed)]
        return self.strategy.aggregate_evaluate(server_round, self._in_site_order(kept) + failed)

    def _tensors(self, reply: Message) -> tuple[dict[str, np.ndarray], str | None]:
        """The reply's tensors as arrays, or the first reason they cannot be aggregated."""
        records = reply.content.array_records
        if len(records) != 1:
            return {}, f"it carries {len(records)} array records where a train reply carries one"
        record = next(iter(records.values()))
        if set(record) != set(self.expected):
            return {}, (
                f"its tensors are {sorted(record)} but the global prompt's are "
                f"{sorted(self.expected)}"
            )
        arrays = {}
        for key, array in record.items():
            shape, dtype = self.expected[key]
            if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
                found = f"{array.dtype} {tuple(array.shape)}"
                return {}, f"tensor {key!r} is {found}, expected {dtype} {shape}"
            try:
                values = array.numpy()
            except (ValueError, TypeError) as err:
                return {}, f"tensor {key!r} cannot be decoded ({err})"
            if values.shape != shape:
                return {}, f"tensor {key!r} decodes to shape {values.shape}, expected {shape}"
            if not np.isfinite(values).all():
                return {}, f"tensor {key!r} holds NaN or Inf"
            arrays[key] = values
        return arrays, None

    def _consistent_metrics(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Keep the replies whose metric names are the most common set, as Flower requires.

        Names that vary with a site's test set (``site_scores.varies_by_site``) are not compared.
        """
        names = {
            id(reply): frozenset(key for key in _metrics(reply) if not varies_by_site(key))
            for reply in replies
        }
        if len(set(names.values())) <= 1:
            return replies
        counts = Counter(names[id(reply)] for reply in self._in_site_order(replies))
        usual = counts.most_common(1)[0][0]
        for reply in replies:
            if names[id(reply)] != usual:
                self._reject(
                    server_round,
                    reply,
                    f"its metrics are {sorted(names[id(reply)])} but the other sites' are "
                    f"{sorted(usual)}",
                )
        return [reply for reply in replies if names[id(reply)] == usual]

    def _without_held_out_sites(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Leave out the held-out sites' replies; reject the claim from any other site."""
        kept = []
        for reply in replies:
            records = [] if reply.has_error() else list(reply.content.metric_records.values())
            if not (len(records) == 1 and records[0].get(HELD_OUT_KEY, 0) == 1):
                kept.append(reply)
                continue
            node_id = reply.metadata.src_node_id
            if self.site_name(node_id) not in self.held_out:
                self._reject(
                    server_round,
                    reply,
                    "it says it is held out of training, but it is not one of the "
                    "evaluation.holdout_sites",
                )
            elif self.on_withhold is not None:
                self.on_withhold(node_id, "held out: an unseen site, it only evaluates")
        return kept

    def _without_exhausted_budgets(
        self, server_round: int, replies: list[Message]
    ) -> list[Message]:
        """Leave out the sites that stopped training because their privacy budget is spent."""
        kept = []
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()))
            if metrics.get(BUDGET_EXHAUSTED_KEY, 0) != 1:
                kept.append(reply)
                continue
            node_id = reply.metadata.src_node_id
            reason = (
                f"privacy budget spent (epsilon {metrics.get('dp-epsilon', float('nan')):.3f}); "
                "the site trains no more"
            )
            log(
                INFO,
                "[fedprompt] round %d: %s is left out of the aggregate: %s",
                server_round,
                self.site_name(node_id),
                reason,
            )
            if self.on_withhold is not None:
                self.on_withhold(node_id, reason)
        return kept

    def _plausible_norms(
        self,
        server_round: int,
        replies: list[Message],
        arrays: Mapping[int, Mapping[str, np.ndarray]],
    ) -> list[Message]:
        """Reject an update whose norm is far above the median of the other sites' norms."""
        norms = {
            id(reply): math.sqrt(
                sum(
                    float(np.sum((values.astype(np.float64) - self._current[key]) ** 2))
                    for key, values in arrays[id(reply)].items()
                )
            )
            for reply in replies
        }
        kept = []
        for reply in replies:
            others = [norms[id(other)] for other in replies if other is not reply]
            if others:
                limit = self.max_update_ratio * max(float(np.median(others)), 1e-12)
                if norms[id(reply)] > limit:
                    self._reject(
                        server_round,
                        reply,
                        f"its update norm {norms[id(reply)]:.4g} is above {self.max_update_ratio:g}"
                        f" x the other sites' median ({float(np.median(others)):.4g})",
                    )
                    continue
            kept.append(reply)
        return kept

    def _in_site_order(self, replies: list[Message]) -> list[Message]:
        return sorted(
            replies,
            key=lambda r: (self.site_name(r.metadata.src_node_id), r.metadata.src_node_id),
        )

    def _reject(self, server_round: int, reply: Message, reason: str) -> None:
        node_id = reply.metadata.src_node_id
        kind = "update" if reply.metadata.message_type == MessageType.TRAIN else "evaluation"
        log(
            WARNING,
            "[fedprompt] round %d: rejected the %s of %s: %s",
            server_round,
            kind,
            self.site_name(node_id),
            reason,
        )
        if self.on_reject is not None:
            self.on_reject(node_id, reply.metadata.message_type, reason)
