"""``fedprompt table``: methods x datasets x protocols x seeds, centralized beside federated.

Each cell of the papers' tables is run twice: centralized (one site holding every training image,
``federation.num_sites=1 partition=iid``) and federated (the experiment's sites). ``table.md``
and ``table.csv`` give the mean and sample standard deviation over seeds of what each run's
``summary.json`` reports: accuracy for few-shot, base and novel accuracy for base-to-novel, with
the harmonic mean of the two means (as the papers compute it) and the mean of each seed's HM.
A centralized cell the papers also report stands beside the published number (``published.csv``)
and the difference, so a reader sees how far this code is from the authors'.
"""

from __future__ import annotations

import csv
import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
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
# What a run's summary.json must report under "final" for the protocol.
METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    FEW_SHOT: (("accuracy", "accuracy"),),
    BASE_TO_NOVEL: (
        ("base_accuracy", "base"),
        ("novel_accuracy", "novel"),
        ("harmonic_mean", "HM"),
    ),
}
HM_OF_MEANS = "harmonic_mean"
HM_PER_SEED = "harmonic_mean_per_seed"
# The table's rows per protocol: HM is the harmonic mean of the mean base and mean novel
# accuracy (BiomedCoOp's and CoOp's tables); "HM per seed" the mean of each run's own HM.
TABLE_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    FEW_SHOT: METRICS[FEW_SHOT],
    BASE_TO_NOVEL: (*METRICS[BASE_TO_NOVEL], (HM_PER_SEED, "HM per seed")),
}
CSV_COLUMNS = (
    "dataset",
    "method",
    "protocol",
    "shots",
    "metric",
    *(f"{where}_{stat}" for where in SETTINGS for stat in ("mean_pct", "std_pct", "n", "failed")),
    "paper_pct",
    "diff_pts",
    "paper_source",
)
PUBLISHED_COLUMNS = (
    "paper",
    "table",
    "method",
    "dataset",
    "protocol",
    "shots",
    "metric",
    "value",
    "source",
    "note",
)
BIOMEDCOOP_DATASETS = (
    "btmri",
    "busi",
    "chmnist",
    "covid_19",
    "ctkidney",
    "dermamnist",
    "kneexray",
    "kvasir",
    "lungcolon",
    "octmnist",
    "retina",
)
# The papers' averages: few-shot over the 11 BiomedCoOp sets, base-to-novel over 10 (BUSI, with
# too few classes to split, is left out; the authors' scripts/biomedcoop/base2new.sh list).
AVERAGED: dict[str, tuple[str, tuple[str, ...]]] = {
    "average-11": (FEW_SHOT, BIOMEDCOOP_DATASETS),
    "average-10": (BASE_TO_NOVEL, tuple(d for d in BIOMEDCOOP_DATASETS if d != "busi")),
}
AVERAGES = tuple(AVERAGED)


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
    recipe: str | None = None
    """A ``configs/recipe`` choice for the centralized cells only (``paper``: the authors')."""


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
    recipe: str | None = None,
) -> TableGrid:
    """The grid the ``fedprompt table`` options describe, checked before anything runs.

    Methods and datasets default to the experiment's; ``shots`` and ``seeds`` are comma lists;
    ``recipe`` applies to the centralized cells only, so they can be set beside the papers.

    Raises:
        GridError: An unknown method, dataset or recipe, a bad number, no protocol, an override
            of a key the table sets itself, or a sweep among the overrides.
    """
    for key, values in parse_sweep(overrides).items():
        option = CONTROLLED.get(bare_key(key))
        if option:
            raise GridError(f"The table sets {bare_key(key)} itself; choose it with {option}.")
        if recipe is not None and bare_key(key) == "recipe":
            raise GridError(
                "--recipe sets the centralized cells' recipe; drop the recipe= override, or "
                "drop --recipe to give every cell that recipe."
            )
        if len(values) > 1:
            raise GridError(
                f"{key} has several values; a table crosses only its own options "
                "(--methods, --datasets, --shots, --seeds): give one value."
            )
    if recipe is not None and recipe not in list_choices("recipe"):
        offered = ", ".join(list_choices("recipe")) or "none (configs/recipe/ is empty or absent)"
        raise GridError(f"Unknown recipe {recipe!r}; choose from {offered}.")
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
        recipe=recipe,
    )


def table_points(grid: TableGrid, overrides: Sequence[str]) -> list[Point]:
    """Every run of the table, central and federated; the user's overrides come first.

    ``grid.recipe`` goes to the centralized points only: they are the ones the papers report,
    while the federated points keep the experiment's federated settings.
    """
    crossed = itertools.product(grid.datasets, grid.methods, grid.protocols, grid.seeds, SETTINGS)
    return [
        _point(dataset, method, protocol, seed, setting, overrides, grid.recipe)
        for dataset, method, protocol, seed, setting in crossed
    ]


def _point(
    dataset: str,
    method: str,
    protocol: Protocol,
    seed: int,
    setting: str,
    overrides: Sequence[str],
    recipe: str | None,
) -> Point:
    shots = f" ({protocol.shots} shots)" if protocol.name == BASE_TO_NOVEL else ""
    recipe_overrides = (f"recipe={recipe}",) if recipe and setting == "central" else ()
    return Point(
        name=f"{dataset}/{method}/{protocol.folder}/{setting}/seed-{seed}",
        overrides=(
            *overrides,
            f"dataset={dataset}",
            f"method={method}",
            *protocol.overrides(),
            f"seed={seed}",
            *SETTINGS[setting],
            *recipe_overrides,
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

    def stats(self) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation over seeds (None where undefined)."""
        return mean_and_std(self.values)

    def text(self) -> str:
        """``mean ± std`` (sample std; the mean alone for one seed), failures marked."""
        mean, std = self.stats()
        if mean is None:
            return "failed" if self.failed else "not run"
        shown = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
        return f"{shown} ({self.failed} failed)" if self.failed else shown


def harmonic(base: float, novel: float) -> float:
    """2 b n / (b + n), zero when both are zero."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


@dataclass(frozen=True)
class HarmonicCell(Cell):
    """The HM of the mean base and mean novel accuracy over seeds, as the papers report it.

    It differs from the mean of each seed's HM (``values``, kept for the seed count) whenever
    base and novel vary across seeds; it has no standard deviation of its own.
    """

    base: tuple[float, ...] = ()
    novel: tuple[float, ...] = ()

    def stats(self) -> tuple[float | None, float | None]:
        """The harmonic mean of the two means, and no spread."""
        if not self.base or not self.novel:
            return None, None
        return harmonic(statistics.fmean(self.base), statistics.fmean(self.novel)), None


@dataclass(frozen=True)
class AverageCell(Cell):
    """The mean over datasets of each dataset's mean, as the papers average their tables.

    ``values`` holds the datasets' means; a dataset without one leaves the average undefined
    rather than silently averaging fewer datasets.
    """

    missing: int = 0

    @classmethod
    def over(cls, cells: Sequence[Cell]) -> AverageCell:
        """The average of these datasets' cells."""
        means = [cell.stats()[0] for cell in cells]
        present = tuple(mean for mean in means if mean is not None)
        failed = sum(cell.failed for cell in cells)
        return cls(present, failed, missing=len(means) - len(present))

    def stats(self) -> tuple[float | None, float | None]:
        """The mean of the datasets' means, and no spread."""
        if self.missing or not self.values:
            return None, None
        return statistics.fmean(self.values), None


@dataclass(frozen=True)
class Published:
    """A number a paper reports for a cell (percent), and where it is printed."""

    paper: str
    table: str
    value: float
    source: str


PublishedKey = tuple[str, str, str, int, str]
"""(dataset, method, protocol, shots, metric), the table's own names."""


def _published_problem(row: Mapping[str, str], methods: set[str], datasets: set[str]) -> str | None:
    """What is wrong with one row of the published numbers, or None."""
    protocol = row["protocol"]
    if not row["source"].strip() or not row["paper"].strip():
        return "no paper or no source"
    if row["method"] not in methods:
        return f"unknown method {row['method']!r}"
    if row["dataset"] not in datasets:
        return f"unknown dataset {row['dataset']!r}"
    if protocol not in TABLE_METRICS:
        return f"unknown protocol {protocol!r}"
    if not row["shots"].isdigit() or int(row["shots"]) < 1:
        return f"shots {row['shots']!r} is not a positive integer"
    if row["metric"] not in {key for key, _ in TABLE_METRICS[protocol]}:
        return f"metric {row['metric']!r} is not one of the {protocol} table's"
    try:
        value = float(row["value"])
    except ValueError:
        value = -1.0
    return None if 0 <= value <= 100 else f"value {row['value']!r} is not a percentage"


def load_published(path: Path | None = None) -> dict[PublishedKey, Published]:
    """The papers' numbers, by the cell they belong to; by default the bundled ``published.csv``.

    Every row must name its source and a method, protocol, shots and metric this table knows,
    so a typo cannot silently leave a cell without its paper. Where two rows give the same
    cell, the first wins (the file lists a method's own paper first).

    Raises:
        ValueError: A row that breaks those rules, named by its line.
    """
    if path is None:
        text = resources.files(__package__).joinpath("published.csv").read_text("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    reader = csv.DictReader(text.splitlines())
    if tuple(reader.fieldnames or ()) != PUBLISHED_COLUMNS:
        raise ValueError(f"published numbers need the columns {', '.join(PUBLISHED_COLUMNS)}.")
    methods, datasets = set(list_choices("method")), {*list_choices("dataset"), *AVERAGES}
    published: dict[PublishedKey, Published] = {}
    for line, row in enumerate(reader, start=2):
        problem = _published_problem(row, methods, datasets)
        if problem:
            raise ValueError(f"published numbers, line {line}: {problem}.")
        key = (row["dataset"], row["method"], row["protocol"], int(row["shots"]), row["metric"])
        published.setdefault(
            key, Published(row["paper"], row["table"], float(row["value"]), row["source"])
        )
    return published


@dataclass(frozen=True)
class TableRow:
    """One metric of a method on a dataset under a protocol, centralized and federated."""

    dataset: str
    method: str
    protocol: Protocol
    metric: str
    label: str
    cells: dict[str, Cell]
    published: Published | None = None

    def diff(self) -> float | None:
        """Centralized mean minus the published number, in points; None without either."""
        mean, _ = self.cells["central"].stats()
        return None if mean is None or self.published is None else mean - self.published.value


def _cell(metric: str, runs: Sequence[Outcome]) -> Cell:
    """A row's cell from the runs of one setting; HM of means from their base and novel."""
    finished = [run.summary["final"] for run in runs if run.summary is not None]
    failed = len(runs) - len(finished)
    source = HM_OF_MEANS if metric == HM_PER_SEED else metric
    values = tuple(100.0 * float(final[source]) for final in finished)
    if metric != HM_OF_MEANS:
        return Cell(values, failed)
    base = tuple(100.0 * float(final["base_accuracy"]) for final in finished)
    novel = tuple(100.0 * float(final["novel_accuracy"]) for final in finished)
    return HarmonicCell(values, failed, base=base, novel=novel)


def table_rows(
    grid: TableGrid,
    outcomes: Sequence[Outcome],
    published: Mapping[PublishedKey, Published] | None = None,
) -> list[TableRow]:
    """Rows in the grid's order from the points' summaries (a failed point counts as failed).

    ``published`` (see ``load_published``) puts the papers' number beside each row it covers.
    """
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
        for metric, label in TABLE_METRICS[protocol.name]:
            cells = {
                setting: _cell(
                    metric,
                    by_cell.get((dataset, method, protocol.name, protocol.shots, setting), []),
                )
                for setting in SETTINGS
            }
            paper = (published or {}).get((dataset, method, protocol.name, protocol.shots, metric))
            rows.append(TableRow(dataset, method, protocol, metric, label, cells, paper))
    return rows + _average_rows(grid, rows, published or {})


def _average_rows(
    grid: TableGrid, rows: Sequence[TableRow], published: Mapping[PublishedKey, Published]
) -> list[TableRow]:
    """The papers' cross-dataset averages, where the grid holds every dataset they average."""
    averages = []
    for name, (family, datasets) in AVERAGED.items():
        if not set(datasets) <= set(grid.datasets):
            continue
        for method, protocol in itertools.product(grid.methods, grid.protocols):
            if protocol.name != family:
                continue
            for metric, label in TABLE_METRICS[family]:
                members = [
                    row
                    for row in rows
                    if (row.method, row.protocol, row.metric) == (method, protocol, metric)
                    and row.dataset in datasets
                ]
                cells: dict[str, Cell] = {
                    setting: AverageCell.over([row.cells[setting] for row in members])
                    for setting in SETTINGS
                }
                paper = published.get((name, method, protocol.name, protocol.shots, metric))
                averages.append(TableRow(name, method, protocol, metric, label, cells, paper))
    return averages


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_csv(rows: Sequence[TableRow], path: Path) -> Path:
    """One line per dataset x method x protocol x metric; accuracies in percent.

    ``paper_pct``, ``diff_pts`` (centralized mean minus paper) and ``paper_source`` are filled
    where a paper reports the cell.
    """
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
                mean, std = cell.stats()
                line += [_number(mean), _number(std), len(cell.values), cell.failed]
            paper = row.published
            line += [
                _number(None if paper is None else paper.value),
                _number(row.diff()),
                "" if paper is None else paper.source,
            ]
            writer.writerow(line)
    return path


def _row_texts(row: TableRow, with_paper: bool) -> list[str]:
    """A row's cells: central, then the paper and the difference where asked, then federated."""
    texts = [row.cells["central"].text()]
    if with_paper:
        diff = row.diff()
        paper = row.published
        texts += [
            "" if paper is None else f"{paper.value:.2f}",
            "" if diff is None else f"{diff:+.2f}",
        ]
    return [*texts, row.cells["federated"].text()]


def _markdown_block(rows: Sequence[TableRow]) -> list[str]:
    """One table of a dataset and protocol family: a row per method, columns side by side.

    A column some paper reports gets ``paper`` and ``diff`` beside its centralized cells.
    """
    methods = list(dict.fromkeys(row.method for row in rows))
    columns = list(dict.fromkeys((row.protocol, row.metric, row.label) for row in rows))
    reported = {(row.protocol, row.metric) for row in rows if row.published is not None}
    heads = []
    for protocol, metric, label in columns:
        words = protocol.label if protocol.name == FEW_SHOT else label
        extra = ("paper", "diff") if (protocol, metric) in reported else ()
        heads += [f"{words} {where}" for where in ("central", *extra, "federated")]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    by_key = {(row.method, row.protocol, row.metric): row for row in rows}
    for method in methods:
        texts = [
            text
            for protocol, metric, _ in columns
            for text in _row_texts(
                by_key[(method, protocol, metric)], (protocol, metric) in reported
            )
        ]
        lines.append(f"| {method} | " + " | ".join(texts) + " |")
    return lines


def _sources(rows: Sequence[TableRow]) -> list[str]:
    """Where the table's published numbers come from, one line per paper table."""
    used = dict.fromkeys(
        (row.published.paper, row.published.table, row.published.source)
        for row in rows
        if row.published is not None
    )
    if not used:
        return []
    return [
        "",
        "## Published numbers",
        "",
        "'paper' is the number the paper reports for the centralized cell; 'diff' is ours minus "
        "it, in points.",
        "",
        *(f"- {paper}, {table}: {source}" for paper, table, source in used),
    ]


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
        "held-out classes; HM is the harmonic mean of the mean base and mean novel accuracy, as "
        "the papers compute it, and 'HM per seed' the mean ± std of each run's own HM.",
    ]
    for dataset in dict.fromkeys(row.dataset for row in rows):
        lines += ["", f"## {dataset}"]
        if dataset in AVERAGED:
            lines += [
                "",
                f"The mean over the {len(AVERAGED[dataset][1])} BiomedCoOp datasets of each "
                "dataset's mean (HM: of each dataset's HM), as the papers average; 'not run' or "
                "'failed' until every dataset has a number.",
            ]
        for family in (FEW_SHOT, BASE_TO_NOVEL):
            block = [r for r in rows if r.dataset == dataset and r.protocol.name == family]
            if block:
                shots = block[0].protocol.shots
                title = "Few-shot" if family == FEW_SHOT else f"Base-to-novel ({shots} shots)"
                lines += ["", f"### {title}", "", *_markdown_block(block)]
    lines += _sources(rows)
    return "\n".join(lines) + "\n"


def describe_settings(cfg: DictConfig, recipe: str | None = None) -> str:
    """The settings every cell shares, in one sentence for the top of ``table.md``."""
    recipe_words = f" under recipe={recipe}" if recipe else ""
    return (
        f"Backbone {cfg.backbone.name}, {cfg.federation.rounds} rounds of "
        f"{cfg.train.local_epochs} local epochs; central: one site holding the whole training "
        f"split{recipe_words}; federated: {cfg.federation.num_sites} sites "
        f"({cfg.partition.name} partition, "
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
    words += ["--recipe", grid.recipe] if grid.recipe else []
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
    identity: dict[str, Any] = {
        "command": "table",
        "experiment": experiment,
        "settings": sorted(overrides),
    }
    if grid.recipe:  # only when set, so tables made before --recipe existed still resume
        identity["recipe"] = grid.recipe
    open_study(out, identity)
    outcomes = run_grid(
        experiment, points, out, runner=runner, result=result_words, check=check_summary
    )
    rows = table_rows(grid, outcomes, load_published())
    about = f"`{command_line(experiment, grid, overrides)}`. {describe_settings(cfg, grid.recipe)}"
    markdown_path = out / "table.md"
    markdown_path.write_text(markdown(rows, grid, about), encoding="utf-8")
    return outcomes, markdown_path, write_csv(rows, out / "table.csv")
