"""``fedprompt table``: methods x datasets x protocols x seeds, centralized beside federated.

Each cell of the papers' tables is run twice: centralized (one site holding every training image,
``federation.num_sites=1 partition=iid``) and federated (the experiment's sites). ``table.md``
and ``table.csv`` give the mean and sample standard deviation over seeds of what each run's
``summary.json`` reports: accuracy for few-shot, base and novel accuracy and their harmonic mean
for base-to-novel.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedprompt.config import compose_config, list_choices
from fedprompt.experiments.grid import (
    GridError,
    Outcome,
    Point,
    PointRunner,
    bare_key,
    check_points,
    mean_and_std,
    open_study,
    parse_sweep,
    run_grid,
)

FEW_SHOT = "few_shot"
BASE_TO_NOVEL = "base_to_novel"
SETTINGS: dict[str, tuple[str, ...]] = {
    "central": ("federation.num_sites=1", "partition=iid"),
    "federated": (),
}
# Keys the table itself sets per point; a user's override of one would be silently replaced.
CONTROLLED = {
    "method": "--methods",
    "dataset": "--datasets",
    "seed": "--seeds",
    "protocol": "--shots or --base-to-novel",
    "train.shots": "--shots or --base-to-novel-shots",
}
METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    FEW_SHOT: (("accuracy", "accuracy"),),
    BASE_TO_NOVEL: (
        ("base_accuracy", "base"),
        ("novel_accuracy", "novel"),
        ("harmonic_mean", "HM"),
    ),
}
CSV_COLUMNS = (
    "dataset",
    "method",
    "protocol",
    "shots",
    "metric",
    *(f"{where}_{stat}" for where in SETTINGS for stat in ("mean_pct", "std_pct", "n", "failed")),
)


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: few-shot with K images per class, or base-to-novel."""

    name: str
    shots: int

    @property
    def label(self) -> str:
        """Column heading words."""
        return f"{self.shots}-shot" if self.name == FEW_SHOT else "base-to-novel"

    @property
    def folder(self) -> str:
        """Path component of its points."""
        return f"shots-{self.shots}" if self.name == FEW_SHOT else f"base-to-novel-{self.shots}"

    def overrides(self) -> tuple[str, ...]:
        """The Hydra overrides that select it."""
        return (f"protocol={self.name}", f"train.shots={self.shots}")


@dataclass(frozen=True)
class TableGrid:
    """What a table crosses: every method on every dataset under every protocol, per seed."""

    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    protocols: tuple[Protocol, ...]
    seeds: tuple[int, ...]


def _names(text: str | None, group: str, default: str) -> tuple[str, ...]:
    if text is None:
        return (default,)
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise GridError(f"--{group}s is empty; name at least one {group}.")
    choices = list_choices(group)
    for name in names:
        if name not in choices:
            raise GridError(f"Unknown {group} {name!r}; choose from {', '.join(choices)}.")
    return names


def _integers(text: str, option: str, example: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(item) for item in text.split(",") if item.strip()))
    except ValueError:
        values = ()
    if not values or min(values) < minimum:
        raise GridError(f"{option} takes integers >= {minimum}, e.g. {example}; got {text!r}.")
    return values


def table_grid(
    experiment: str,
    overrides: Sequence[str],
    *,
    methods: str | None = None,
    datasets: str | None = None,
    shots: str | None = None,
    base_to_novel: bool = False,
    base_to_novel_shots: int = 16,
    seeds: str = "1,2,3",
) -> TableGrid:
    """The grid the ``fedprompt table`` options describe, checked before anything runs.

    Methods and datasets default to the experiment's; ``shots`` and ``seeds`` are comma lists.

    Raises:
        GridError: An unknown method or dataset, a bad number, no protocol, an override of a
            key the table sets itself, or a sweep among the overrides.
    """
    for key, values in parse_sweep(overrides).items():
        option = CONTROLLED.get(bare_key(key))
        if option:
            raise GridError(f"The table sets {bare_key(key)} itself; choose it with {option}.")
        if len(values) > 1:
            raise GridError(
                f"{key} has several values; a table crosses only its own options "
                "(--methods, --datasets, --shots, --seeds): give one value."
            )
    cfg = compose_config(experiment, overrides)
    protocols = []
    if shots is not None:
        protocols += [Protocol(FEW_SHOT, k) for k in _integers(shots, "--shots", "1,2,4,8,16", 1)]
    if base_to_novel:
        if base_to_novel_shots < 1:
            raise GridError("--base-to-novel-shots takes a positive number of images per class.")
        protocols.append(Protocol(BASE_TO_NOVEL, base_to_novel_shots))
    if not protocols:
        raise GridError("The table has no protocol; add --shots 1,2,4,8,16 and/or --base-to-novel.")
    return TableGrid(
        methods=_names(methods, "method", str(cfg.method.name)),
        datasets=_names(datasets, "dataset", str(cfg.dataset.name)),
        protocols=tuple(protocols),
        seeds=_integers(seeds, "--seeds", "1,2,3", 0),
    )


def table_points(grid: TableGrid, overrides: Sequence[str]) -> list[Point]:
    """Every run of the table, central and federated; the user's overrides come first."""
    crossed = itertools.product(grid.datasets, grid.methods, grid.protocols, grid.seeds, SETTINGS)
    return [
        _point(dataset, method, protocol, seed, setting, overrides)
        for dataset, method, protocol, seed, setting in crossed
    ]


def _point(
    dataset: str, method: str, protocol: Protocol, seed: int, setting: str, overrides: Sequence[str]
) -> Point:
    shots = f" ({protocol.shots} shots)" if protocol.name == BASE_TO_NOVEL else ""
    return Point(
        name=f"{dataset}/{method}/{protocol.folder}/{setting}/seed-{seed}",
        overrides=(
            *overrides,
            f"dataset={dataset}",
            f"method={method}",
            *protocol.overrides(),
            f"seed={seed}",
            *SETTINGS[setting],
        ),
        labels={
            "dataset": dataset,
            "method": method,
            "protocol": protocol.name,
            "shots": protocol.shots,
            "setting": setting,
            "seed": seed,
        },
        description=f"{dataset} {method} {protocol.label}{shots} {setting} seed={seed}",
    )


def check_summary(point: Point, summary: Mapping[str, Any]) -> str | None:
    """The run applied the point's protocol and reported the table's metrics, else why not."""
    wanted = {"name": point.labels["protocol"], "shots": point.labels["shots"]}
    reported = summary.get("protocol")
    if not isinstance(reported, Mapping) or {k: reported.get(k) for k in wanted} != wanted:
        return (
            f"its summary.json reports protocol {reported}, not {wanted}; the run did not "
            "apply the protocol, so its numbers cannot enter the table."
        )
    final = summary.get("final") or {}
    for key, _ in METRICS[str(point.labels["protocol"])]:
        if final.get(key) is None:
            return f"its summary.json has no final.{key}."
    return None


def result_words(summary: Mapping[str, Any]) -> str:
    """The progress line's numbers: accuracy, or base, novel and HM."""
    final = summary.get("final") or {}
    protocol = (summary.get("protocol") or {}).get("name")
    keys = METRICS[BASE_TO_NOVEL] if protocol == BASE_TO_NOVEL else METRICS[FEW_SHOT]
    return (
        ", ".join(
            f"{label} {100 * final[key]:.1f}%" for key, label in keys if final.get(key) is not None
        )
        or "no accuracy reported"
    )


@dataclass(frozen=True)
class Cell:
    """One metric of one setting over seeds: the values (percent) and how many seeds failed."""

    values: tuple[float, ...]
    failed: int

    def text(self) -> str:
        """``mean ± std`` (sample std; the mean alone for one seed), failures marked."""
        mean, std = mean_and_std(self.values)
        if mean is None:
            return "failed" if self.failed else "not run"
        shown = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
        return f"{shown} ({self.failed} failed)" if self.failed else shown


@dataclass(frozen=True)
class TableRow:
    """One metric of a method on a dataset under a protocol, centralized and federated."""

    dataset: str
    method: str
    protocol: Protocol
    metric: str
    label: str
    cells: dict[str, Cell]


def table_rows(grid: TableGrid, outcomes: Sequence[Outcome]) -> list[TableRow]:
    """Rows in the grid's order from the points' summaries (a failed point counts as failed)."""
    by_cell: dict[tuple[Any, ...], list[Outcome]] = {}
    for outcome in outcomes:
        labels = outcome.point.labels
        key = (
            labels["dataset"],
            labels["method"],
            labels["protocol"],
            labels["shots"],
            labels["setting"],
        )
        by_cell.setdefault(key, []).append(outcome)
    rows = []
    for dataset, method, protocol in itertools.product(grid.datasets, grid.methods, grid.protocols):
        for metric, label in METRICS[protocol.name]:
            cells = {}
            for setting in SETTINGS:
                runs = by_cell.get((dataset, method, protocol.name, protocol.shots, setting), [])
                values = tuple(
                    100.0 * float(run.summary["final"][metric])
                    for run in runs
                    if run.summary is not None
                )
                cells[setting] = Cell(values, sum(run.summary is None for run in runs))
            rows.append(TableRow(dataset, method, protocol, metric, label, cells))
    return rows


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_csv(rows: Sequence[TableRow], path: Path) -> Path:
    """One line per dataset x method x protocol x metric; accuracies in percent."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            line: list[Any] = [
                row.dataset,
                row.method,
                row.protocol.name,
                row.protocol.shots,
                row.metric,
            ]
            for setting in SETTINGS:
                cell = row.cells[setting]
                mean, std = mean_and_std(cell.values)
                line += [_number(mean), _number(std), len(cell.values), cell.failed]
            writer.writerow(line)
    return path


def _markdown_block(rows: Sequence[TableRow]) -> list[str]:
    """One table of a dataset and protocol family: a row per method, columns side by side."""
    methods = list(dict.fromkeys(row.method for row in rows))
    columns = list(dict.fromkeys((row.protocol, row.metric, row.label) for row in rows))
    heads = []
    for protocol, _, label in columns:
        for setting in SETTINGS:
            words = protocol.label if protocol.name == FEW_SHOT else label
            heads.append(f"{words} {setting}")
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    cells = {(row.method, row.protocol, row.metric): row.cells for row in rows}
    for method in methods:
        texts = [
            cells[(method, protocol, metric)][setting].text()
            for protocol, metric, _ in columns
            for setting in SETTINGS
        ]
        lines.append(f"| {method} | " + " | ".join(texts) + " |")
    return lines


def markdown(rows: Sequence[TableRow], grid: TableGrid, about: str) -> str:
    """``table.md``: per dataset, a few-shot table and a base-to-novel table."""
    seeds = ", ".join(str(seed) for seed in grid.seeds)
    lines = [
        "# fedprompt table",
        "",
        about,
        "",
        f"Percent on the whole test split; mean ± sample standard deviation over seeds {seeds} "
        "(the mean alone where one seed finished; failed runs are counted in brackets). "
        "Base-to-novel: 'base' and 'novel' are accuracy on the classes trained on and on the "
        "held-out classes, HM the mean over seeds of each run's harmonic mean of the two.",
    ]
    for dataset in grid.datasets:
        lines += ["", f"## {dataset}"]
        for family in (FEW_SHOT, BASE_TO_NOVEL):
            block = [r for r in rows if r.dataset == dataset and r.protocol.name == family]
            if block:
                shots = block[0].protocol.shots
                title = "Few-shot" if family == FEW_SHOT else f"Base-to-novel ({shots} shots)"
                lines += ["", f"### {title}", "", *_markdown_block(block)]
    return "\n".join(lines) + "\n"


def describe_settings(cfg: DictConfig) -> str:
    """The settings every cell shares, in one sentence for the top of ``table.md``."""
    return (
        f"Backbone {cfg.backbone.name}, {cfg.federation.rounds} rounds of "
        f"{cfg.train.local_epochs} local epochs; central: one site holding the whole training "
        f"split; federated: {cfg.federation.num_sites} sites ({cfg.partition.name} partition, "
        f"{cfg.strategy.name}). K shots are K images per class at each site, drawn from what the "
        "site holds."
    )


def command_line(experiment: str, grid: TableGrid, overrides: Sequence[str]) -> str:
    """The command that makes this table, for the top of ``table.md``."""
    few_shot = [str(p.shots) for p in grid.protocols if p.name == FEW_SHOT]
    base_to_novel = [p.shots for p in grid.protocols if p.name == BASE_TO_NOVEL]
    words = ["fedprompt table", experiment, "--methods", ",".join(grid.methods)]
    words += ["--datasets", ",".join(grid.datasets)]
    words += ["--shots", ",".join(few_shot)] if few_shot else []
    words += (
        ["--base-to-novel", "--base-to-novel-shots", str(base_to_novel[0])] if base_to_novel else []
    )
    words += ["--seeds", ",".join(str(seed) for seed in grid.seeds), *overrides]
    return " ".join(words)


def run_table(
    experiment: str,
    grid: TableGrid,
    overrides: Sequence[str],
    out: Path,
    runner: PointRunner | None = None,
) -> tuple[list[Outcome], Path, Path]:
    """Run the table's points not yet finished under ``out`` and write its two files.

    Returns:
        The outcomes, and the paths of ``table.md`` and ``table.csv``.

    Raises:
        GridError: ``out`` holds a different study, or a point's folder another run.
    """
    points = table_points(grid, overrides)
    cfg = compose_config(experiment, overrides)
    if runner is None:
        check_points(experiment, points)
    open_study(out, {"command": "table", "experiment": experiment, "settings": sorted(overrides)})
    outcomes = run_grid(
        experiment, points, out, runner=runner, result=result_words, check=check_summary
    )
    rows = table_rows(grid, outcomes)
    about = f"`{command_line(experiment, grid, overrides)}`. {describe_settings(cfg)}"
    markdown_path = out / "table.md"
    markdown_path.write_text(markdown(rows, grid, about), encoding="utf-8")
    return outcomes, markdown_path, write_csv(rows, out / "table.csv")
