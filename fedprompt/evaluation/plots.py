"""Run and study plots: metrics against epsilon and per round, site views, calibration.

Accuracy, attack AUC or ECE against epsilon; accuracy per round. ``site_views`` shows one image
as each simulated site's scanner acquires it; ``per_site_accuracy`` each site's accuracy under the
global and under its personalized prompt; ``reliability_diagram`` whether the model's confidence
matches how often it is right (Guo et al., ICML 2017), and ``confusion_heatmap`` which classes it
mistakes for which.

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no global
figure state, no display needed, and saving a PNG uses the Agg canvas whatever the process's
backend.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from PIL import Image

from fedprompt.data.acquisition import AcquisitionProfile
from fedprompt.evaluation.metrics import Reliability

Metric = Literal["accuracy", "mia_auc", "ece"]
_METRIC_LABELS = {
    "accuracy": "accuracy (%)",
    "mia_auc": "membership-inference AUC",
    "ece": "expected calibration error (%)",
}
RELIABILITY_PLOT = "reliability_diagram.png"
CONFUSION_PLOT = "confusion_matrix.png"
SITE_RELIABILITY_PLOT = "reliability_diagram_per_site.png"
"""The figures a run writes into its results folder at its end."""


@dataclass(frozen=True)
class StudyPoint:
    """One run of a study: a method at a privacy budget and seed, and what it reached.

    Attributes:
        method: Method (or method and setting) name, one line per value in the plots.
        epsilon: The run's epsilon (the largest over its sites); ``math.inf`` without DP.
        seed: The run's seed; points that differ only in seed make one error bar.
        accuracy: Final accuracy, a fraction in [0, 1].
        mia_auc: The membership-inference AUC on the final prompt, where measured.
        ece: The final expected calibration error, a fraction, where measured.
    """

    method: str
    epsilon: float
    seed: int
    accuracy: float
    mia_auc: float | None = None
    ece: float | None = None


def _mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _value(point: StudyPoint, metric: Metric) -> float | None:
    if metric == "accuracy":
        return 100.0 * point.accuracy
    if metric == "ece":
        return None if point.ece is None else 100.0 * point.ece
    return point.mia_auc


def metric_vs_epsilon(
    points: Sequence[StudyPoint],
    path: str | os.PathLike | None = None,
    *,
    metric: Metric = "accuracy",
    title: str | None = None,
) -> Figure:
    """Mean over seeds, with one-standard-deviation error bars, against epsilon (log axis).

    Non-private runs (``epsilon`` infinite) are drawn as a dashed horizontal line with a band in
    the method's colour, since they sit at no finite epsilon. For the attack AUC, a dotted line
    marks chance (0.5).

    Args:
        points: The study's runs.
        path: Where to save the PNG, if anywhere.
        metric: ``accuracy`` or ``ece`` (in percent), or ``mia_auc``.
        title: Figure title.

    Raises:
        ValueError: No point has a value for ``metric``.
    """
    grouped: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for point in points:
        value = _value(point, metric)
        if value is not None:
            grouped[point.method][float(point.epsilon)].append(value)
    if not grouped:
        raise ValueError(f"No study point has a value for {metric!r}.")
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    colours = _colours(len(grouped))
    for colour, (method, by_epsilon) in zip(colours, sorted(grouped.items()), strict=True):
        finite = sorted(eps for eps in by_epsilon if math.isfinite(eps))
        if finite:
            stats = [_mean_and_spread(by_epsilon[eps]) for eps in finite]
            axes.errorbar(
                finite,
                [mean for mean, _ in stats],
                yerr=[spread for _, spread in stats],
                marker="o",
                capsize=3,
                color=colour,
                label=method,
            )
        if math.inf in by_epsilon:
            mean, spread = _mean_and_spread(by_epsilon[math.inf])
            axes.axhline(mean, color=colour, linestyle="--", linewidth=1, label=f"{method}, no DP")
            if spread:
                axes.axhspan(mean - spread, mean + spread, color=colour, alpha=0.12, linewidth=0)
    if metric == "mia_auc":
        axes.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    axes.set_xscale("log")
    budgets = sorted({eps for by_eps in grouped.values() for eps in by_eps if math.isfinite(eps)})
    if budgets:  # ticks at the study's budgets, written as numbers, not powers of ten
        axes.set_xticks(budgets, [f"{eps:g}" for eps in budgets])
        axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("epsilon (per site, whole run)")
    axes.set_ylabel(_METRIC_LABELS[metric])
    _finish(axes, title, sort_legend=True)
    return _saved(figure, path)


def accuracy_vs_epsilon(
    points: Sequence[StudyPoint], path: str | os.PathLike | None = None, *, title: str | None = None
) -> Figure:
    """Accuracy (%) against epsilon per method, with error bars over seeds."""
    return metric_vs_epsilon(points, path, metric="accuracy", title=title)


def round_accuracies(
    lines: Sequence[Mapping[str, Any]], source: Literal["central", "federated"] = "central"
) -> list[tuple[int, float]]:
    """(round, accuracy) pairs from a run's ``metrics.jsonl`` lines, where measured.

    Args:
        lines: The parsed lines of ``metrics.jsonl``.
        source: ``central`` (the global prompt on the whole test split) or ``federated`` (the
            sites' own test sets, weighted by size).
    """
    pairs = []
    for line in lines:
        if source == "central":
            central = line.get("central") or {}
            value = central.get("accuracy")
        else:
            value = line.get("federated_accuracy")
        if value is not None:
            pairs.append((int(line["round"]), float(value)))
    return pairs


def accuracy_per_round(
    runs: Mapping[str, Sequence[Sequence[tuple[int, float]]]],
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Accuracy (%) per round, one line per label: the mean over its runs, a band of one std.

    Args:
        runs: For each label (a method, a budget), one (round, accuracy) series per seed, e.g.
            from ``round_accuracies``; accuracies are fractions in [0, 1].
        path: Where to save the PNG, if anywhere.
        title: Figure title.

    Raises:
        ValueError: No series holds a point.
    """
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    colours = _colours(len(runs))
    drawn = False
    for colour, (label, series) in zip(colours, runs.items(), strict=True):
        by_round: dict[int, list[float]] = defaultdict(list)
        for run in series:
            for round_number, accuracy in run:
                by_round[round_number].append(100.0 * accuracy)
        if not by_round:
            continue
        rounds = sorted(by_round)
        stats = [_mean_and_spread(by_round[r]) for r in rounds]
        means = np.array([mean for mean, _ in stats])
        spreads = np.array([spread for _, spread in stats])
        axes.plot(rounds, means, marker=".", color=colour, label=f"{label} (n={len(series)})")
        axes.fill_between(rounds, means - spreads, means + spreads, color=colour, alpha=0.15)
        drawn = True
    if not drawn:
        raise ValueError("No run has an accuracy to plot.")
    axes.set_xlabel("round")
    axes.set_ylabel(_METRIC_LABELS["accuracy"])
    axes.xaxis.get_major_locator().set_params(integer=True)
    _finish(axes, title)
    return _saved(figure, path)


def site_views(
    image: Image.Image,
    identity: str,
    profiles: Sequence[AcquisitionProfile],
    site_names: Sequence[str],
    path: str | os.PathLike | None = None,
) -> Figure:
    """One image as stored and as each site's scanner acquires it, side by side.

    Shows what ``partition.acquisition=scanner`` does before any number is read: whether the
    sites differ as scanners do, and whether the images are still readable.

    Args:
        image: The image as stored (RGB).
        identity: Its identity, which seeds each profile's noise as in training.
        profiles: One profile per site.
        site_names: The sites' names, in the same order.
        path: Where to save the PNG, if anywhere.

    Raises:
        ValueError: Profiles and site names differ in number.
    """
    if len(profiles) != len(site_names):
        raise ValueError(f"{len(profiles)} profiles for {len(site_names)} sites; give one each.")
    columns = min(len(profiles) + 1, 6)
    rows = math.ceil((len(profiles) + 1) / columns)
    figure = Figure(figsize=(2.4 * columns, 3.0 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    shown = [("as stored", image)] + [
        (
            f"{name}\nc={p.contrast:.2f} g={p.gamma:.2f} blur={p.blur:.1f}\n"
            f"noise={p.noise:.3f} scale={p.scale:.2f} {p.bits} bit",
            p(image, identity),
        )
        for name, p in zip(site_names, profiles, strict=True)
    ]
    for axes, (title, picture) in zip(panels, shown, strict=False):
        axes.imshow(np.asarray(picture.convert("RGB")))
        axes.set_title(title, fontsize="x-small")
    for axes in panels:
        axes.set_axis_off()
    return _saved(figure, path)


def per_site_accuracy(
    panels: Mapping[str, Sequence[Mapping[str, Mapping[str, Any]]]],
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Each site's accuracy (%) under the global prompt beside its personalized one, per panel.

    The sites' weighted mean hides who gains from personalization and who loses (a site whose
    label mix or scanner sets it apart); this shows it site by site. Bars are the mean over
    seeds with one sample standard deviation. A held-out site has no prompt of its own: its
    global bar stands alone, its name marked.

    Args:
        panels: For each panel's label (a method, or method and scheme), one mapping per seed as
            ``summary.json`` holds it in ``final.per_site``: site -> ``accuracy``,
            ``personalized_accuracy`` (absent without one), ``held_out`` (where true);
            accuracies are fractions in [0, 1].
        path: Where to save the PNG, if anywhere.
        title: Figure title.

    Raises:
        ValueError: No site in any panel has a personalized accuracy.
    """
    drawn = {
        label: runs
        for label, runs in panels.items()
        if any(
            site.get("personalized_accuracy") is not None for run in runs for site in run.values()
        )
    }
    if not drawn:
        raise ValueError(
            "No site has a personalized accuracy to plot; run a personalization scheme."
        )
    columns = min(len(drawn), 3)
    rows = math.ceil(len(drawn) / columns)
    widest = max(len({name for run in runs for name in run}) for runs in drawn.values())
    figure = Figure(
        figsize=(max(4.0, 0.9 * widest + 1.5) * columns, 3.6 * rows), layout="constrained"
    )
    grid = figure.subplots(rows, columns, squeeze=False, sharey=True).reshape(-1)
    width = 0.4
    for axes, (label, runs) in zip(grid, drawn.items(), strict=False):
        sites = list(dict.fromkeys(name for run in runs for name in run))
        for offset, key, name, colour in (
            (-width / 2, "accuracy", "global", "C0"),
            (width / 2, "personalized_accuracy", "personalized", "C1"),
        ):
            positions, means, spreads = [], [], []
            for index, site in enumerate(sites):
                values = [
                    100.0 * run[site][key] for run in runs if run.get(site, {}).get(key) is not None
                ]
                if values:
                    mean, spread = _mean_and_spread(values)
                    positions.append(index + offset)
                    means.append(mean)
                    spreads.append(spread)
            errors = spreads if any(spreads) else None  # one seed: no spread to draw
            axes.bar(positions, means, width, yerr=errors, capsize=3, color=colour, label=name)
        held_out = {site for run in runs for site, scores in run.items() if scores.get("held_out")}
        names = [f"{site}\n(held out)" if site in held_out else site for site in sites]
        axes.set_xticks(range(len(sites)), names, fontsize="small")
        axes.set_ylim(0, 100)
        axes.grid(True, axis="y", alpha=0.3)
        axes.set_title(f"{label} (n={len(runs)})", fontsize="small")
    for axes in grid[len(drawn) :]:
        axes.set_axis_off()
    for axes in grid[::columns]:
        axes.set_ylabel(_METRIC_LABELS["accuracy"])
    grid[0].legend(fontsize="small", frameon=False)
    if title:
        figure.suptitle(title)
    return _saved(figure, path)


def _bin_centres(bins: int) -> np.ndarray:
    return (np.arange(bins) + 0.5) / bins


def _reliability_panels(
    accuracy_axes: Axes, count_axes: Axes, bins: Reliability, title: str
) -> None:
    """Accuracy per confidence bin against the diagonal, the bin's images below."""
    width = 1.0 / len(bins.count)
    centres = _bin_centres(len(bins.count))
    filled = [b for b, n in enumerate(bins.count) if n]
    accuracy = bins.accuracy()
    accuracy_axes.bar(
        centres[filled],
        [accuracy[b] for b in filled],
        width,
        color="C0",
        edgecolor="white",
        label="accuracy",
    )
    if bins.confidence:
        mean = [bins.confidence[b] / bins.count[b] for b in filled]
        accuracy_axes.plot(centres[filled], mean, "o", color="C3", ms=4, label="mean confidence")
    accuracy_axes.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="calibrated")
    accuracy_axes.set_xlim(0, 1)
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_title(title, fontsize="small")
    accuracy_axes.legend(fontsize="x-small", frameon=False, loc="upper left")
    accuracy_axes.grid(True, alpha=0.3)
    count_axes.bar(centres, bins.count, width, color="C7", edgecolor="white")
    count_axes.set_xlim(0, 1)
    count_axes.set_xlabel("confidence (largest class probability)")
    count_axes.set_ylabel("images")


def _ece_words(ece: float | None) -> str:
    return "ECE not known" if ece is None else f"ECE {100 * ece:.1f}%"


def reliability_diagram(
    bins: Reliability,
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    ece: float | None = None,
) -> Figure:
    """Accuracy and number of images per confidence bin, the ECE in the title.

    Bars under the diagonal are bins where the model is more confident than right (Guo et al.,
    2017, Fig. 1). ``ece`` is used where the bins hold no confidence (a site's shared counts).
    """
    figure = Figure(figsize=(5.0, 5.2), layout="constrained")
    accuracy_axes, count_axes = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    words = _ece_words(bins.ece if bins.ece is not None else ece)
    heading = f"{title}: {words}" if title else words
    _reliability_panels(accuracy_axes, count_axes, bins, heading)
    return _saved(figure, path)


def site_reliability_diagrams(
    sites: Mapping[str, tuple[Reliability, float | None]],
    path: str | os.PathLike | None = None,
) -> Figure:
    """Each site's reliability diagram (its shared bin counts), its ECE in the panel's title.

    Args:
        sites: Site name -> its bins and the ECE it reported.
        path: Where to save the PNG, if anywhere.

    Raises:
        ValueError: No site.
    """
    if not sites:
        raise ValueError("No site shared its bins; set evaluation.share_site_histograms=true.")
    columns = min(len(sites), 4)
    rows = math.ceil(len(sites) / columns)
    figure = Figure(figsize=(3.6 * columns, 4.2 * rows), layout="constrained")
    grid = figure.subplots(
        2 * rows, columns, squeeze=False, gridspec_kw={"height_ratios": [3, 1] * rows}
    )
    for index, (name, (bins, ece)) in enumerate(sites.items()):
        row, column = divmod(index, columns)
        words = f"{name}: {_ece_words(ece)}, {sum(bins.count)} images"
        _reliability_panels(grid[2 * row, column], grid[2 * row + 1, column], bins, words)
    for index in range(len(sites), rows * columns):
        row, column = divmod(index, columns)
        grid[2 * row, column].set_axis_off()
        grid[2 * row + 1, column].set_axis_off()
    return _saved(figure, path)


def confusion_heatmap(
    counts: Sequence[Sequence[int]],
    classnames: Sequence[str],
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """The confusion matrix as a heat map, the count written in each cell.

    True classes are rows, predicted classes columns, as ``metrics.confusion_matrix`` counts.

    Raises:
        ValueError: The matrix is not square with one row per class.
    """
    matrix = np.asarray(counts, dtype=np.int64)
    if matrix.shape != (len(classnames), len(classnames)):
        raise ValueError(
            f"A confusion matrix of shape {matrix.shape} for {len(classnames)} classes; "
            "give one row and one column per class."
        )
    size = max(4.0, 0.9 * len(classnames) + 2.0)
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, label="images")
    brightest = matrix.max() if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        colour = "white" if brightest and value > brightest / 2 else "black"
        axes.text(column, row, str(value), ha="center", va="center", color=colour)
    ticks = range(len(classnames))
    axes.set_xticks(ticks, classnames, rotation=30, ha="right", fontsize="small")
    axes.set_yticks(ticks, classnames, fontsize="small")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if title:
        axes.set_title(title)
    return _saved(figure, path)


def _colours(count: int) -> list[str]:
    """Colours of matplotlib's default cycle (tab10), repeating past ten."""
    return [f"C{i % 10}" for i in range(count)]


def _finish(axes: Axes, title: str | None, sort_legend: bool = False) -> None:
    axes.grid(True, which="major", alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if sort_legend:  # a method's private line next to its non-private one
        order = sorted(range(len(labels)), key=labels.__getitem__)
        handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    axes.legend(handles, labels, fontsize="small", frameon=False)
    if title:
        axes.set_title(title)


def _saved(figure: Figure, path: str | os.PathLike | None) -> Figure:
    """Saves ``figure`` as a PNG at ``path`` (folders created) when a path is given."""
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=150, format="png")
    return figure
