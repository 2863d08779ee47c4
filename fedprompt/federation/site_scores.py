"""A site's test scores as its evaluation reply's metric keys, and how the server reads them back.

Only scalars leave a site, never a per-image output. By default a site with test images sends
``accuracy``, ``balanced-accuracy``, ``macro-f1``, ``ece``, ``brier`` and, per class id ``k``,
``sensitivity-k`` (where its test set holds class ``k``) and ``specificity-k`` (where it holds
another class). With ``evaluation.share_site_histograms=true`` it also sends, per confidence bin
``b``, ``reliability-count-b`` and ``reliability-correct-b``: counts of its test images, which
tell the server how its test set is spread over confidence and how many it got right in each bin,
so that the server can draw the site's reliability diagram.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedprompt.evaluation.metrics import ECE_BINS, ClassificationMetrics, Reliability

SiteClasses = Callable[[str], Sequence[str]]
"""The class names a site scores, by the site's name."""

PER_CLASS_KEY = re.compile(r"^(sensitivity|specificity)-(\d+)$")
RELIABILITY_KEY = re.compile(r"^reliability-(count|correct)-(\d+)$")
PER_CLASS_METRICS = ("sensitivity", "specificity")


def reply_metrics(metrics: ClassificationMetrics, share_histograms: bool) -> dict[str, float | int]:
    """The scores of a site that holds test images, keyed as its reply sends them.

    A per-class value the site cannot compute (no image of the class, or only images of it) is
    left out rather than sent as a made-up number.
    """
    values: dict[str, float | int] = {
        "accuracy": metrics.accuracy,
        "balanced-accuracy": metrics.balanced_accuracy,
        "macro-f1": metrics.macro_f1,
    }
    if metrics.ece is not None and metrics.brier is not None:
        values["ece"] = metrics.ece
        values["brier"] = metrics.brier
    for name in PER_CLASS_METRICS:
        for index, value in enumerate(getattr(metrics, name)):
            if value is not None:
                values[f"{name}-{index}"] = value
    if share_histograms and metrics.reliability is not None:
        for index, (count, right) in enumerate(
            zip(metrics.reliability.count, metrics.reliability.correct, strict=True)
        ):
            values[f"reliability-count-{index}"] = count
            values[f"reliability-correct-{index}"] = right
    return values


def varies_by_site(key: str) -> bool:
    """Whether a reply may or may not carry ``key`` depending on its site's test set.

    Per-class values: a site's test set may lack a class. Such keys are left out of the check
    that every site sends the same metrics, and out of Flower's averaging, which needs equal
    key sets (the bins, which sum over sites, are no average either).
    """
    return bool(PER_CLASS_KEY.match(key) or RELIABILITY_KEY.match(key))


def per_class(metrics: Mapping[str, Any], num_classes: int) -> dict[str, list[float | None]] | None:
    """``sensitivity`` and ``specificity`` by class id from a reply's keys (None: not sent).

    None where the site sent no per-class key at all (a site without test images, or one that
    predates them).
    """
    lists: dict[str, list[float | None]] = {n: [None] * num_classes for n in PER_CLASS_METRICS}
    found = False
    for key, value in metrics.items():
        match = PER_CLASS_KEY.match(key)
        if match and int(match[2]) < num_classes:
            lists[match[1]][int(match[2])] = float(value)
            found = True
    return lists if found else None


def shared_reliability(metrics: Mapping[str, Any]) -> Reliability | None:
    """The bin counts a site shared under ``evaluation.share_site_histograms``, else None."""
    if "reliability-count-0" not in metrics:
        return None
    count = tuple(int(metrics[f"reliability-count-{b}"]) for b in range(ECE_BINS))
    correct = tuple(int(metrics[f"reliability-correct-{b}"]) for b in range(ECE_BINS))
    return Reliability(count, correct)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value == int(value)


def detail_problem(
    metrics: Mapping[str, Any], share_histograms: bool, num_classes: int | None
) -> str | None:
    """Why a reply's per-class values or bin counts are malformed or unasked-for, else None.

    A site sends bin counts only when the run asks for them: unasked, they are refused, so that
    they never reach ``metrics.jsonl``. Asked, a site sends both counts of every bin, each a
    whole number, the right ones at most the bin's. A per-class key names a class the site has
    (``num_classes``: the size of its class list; None leaves the ids unchecked), with a value
    in [0, 1].
    """
    bins = {key for key in metrics if RELIABILITY_KEY.match(key)}
    if bins and not share_histograms:
        return (
            "it sends per-bin counts of its test set, which this run did not ask for "
            "(evaluation.share_site_histograms=false)"
        )
    expected = {f"reliability-{kind}-{b}" for kind in ("count", "correct") for b in range(ECE_BINS)}
    if bins and bins != expected:
        return f"its reliability bins are {sorted(bins)}, not the {ECE_BINS} bins' two counts each"
    for b in range(ECE_BINS if bins else 0):
        count, right = metrics[f"reliability-count-{b}"], metrics[f"reliability-correct-{b}"]
        if not (_whole(count) and _whole(right) and 0 <= right <= count):
            return f"its reliability bin {b} counts {right!r} right of {count!r}"
    for key, value in metrics.items():
        match = PER_CLASS_KEY.match(key)
        if not match:
            continue
        if num_classes is not None and int(match[2]) >= num_classes:
            return f"its metric {key!r} names a class beyond the site's {num_classes}"
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            return f"its metric {key!r} is {value!r}, not a fraction"
    return None


def by_class_name(
    values: Sequence[float | None] | None, classnames: Sequence[str]
) -> dict[str, float | None] | None:
    """A per-class list by class id as a mapping by class name (what ``summary.json`` shows)."""
    if values is None:
        return None
    padded = list(values) + [None] * (len(classnames) - len(values))
    return dict(zip(classnames, padded, strict=False))
