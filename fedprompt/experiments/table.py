"""``fedprompt table``: methods x datasets x protocols x seeds, centralized beside federated.

Each cell of the papers' tables is run twice: centralized (one site holding every training image,
``federation.num_sites=1 partition=iid``) and federated (the experiment's sites). ``table.md``
and ``table.csv`` give the mean and sample standard deviation over seeds of what each run's
``summary.json`` reports: accuracy for few-shot, base and novel accuracy for base-to-novel, with
the harmonic mean of the two means (as the papers compute it) and the mean of each seed's HM.
A centralized cell the papers also report stands beside the published number (``published.csv``)
and the difference, so a reader sees how far this code is from the authors'.

``--partitions`` and ``--personalization`` cross the federated cells with label or scanner
partitions and personalization schemes; the table then also gives the sites' view: the global
prompt on the training sites' own test images, each site's personalized prompt on the same images,
and the global prompt on held-out sites, with a plot of each site's global and personalized
accuracy. The centralized cell (one site: nothing to partition or personalize) is run once and
shared by those rows.
"""

from __future__ import annotations

import csv
import functools
import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedprompt.config import CONFIG_DIR, compose_config, list_choices
from fedprompt.data.acquisition import ACQUISITIONS
from fedprompt.evaluation.metrics import mean_sensitivity
from fedprompt.evaluation.plots import per_site_accuracy
from fedprompt.experiments.grid import (
    GridError,
    Outcome,
    Point,
    PointRunner,
    bare_key,
    check_points,
    folder_name,
    mean_and_std,
    open_study,
    parse_sweep,
    run_grid,
    value_of,
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
    "partition": "--partitions",
    "personalization": "--personalization",
}
# Groups the table crosses: a user's override of one of their keys (partition.alpha=0.3) goes
# to the points whose choice has that key, so one table can hold iid beside dirichlet.
AXIS_GROUPS = ("partition", "personalization")
# What the centralized points run of those groups: one site, nothing to partition or personalize.
CENTRAL_CHOICES = {"partition": "iid", "personalization": "none"}
HOLDOUT_SITES = "evaluation.holdout_sites"
# What a run's summary.json must report under "final" for the protocol.
METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    FEW_SHOT: (("accuracy", "accuracy"),),
    BASE_TO_NOVEL: (
        ("base_accuracy", "base"),
        ("novel_accuracy", "novel"),
        ("harmonic_mean", "HM"),
    ),
}
# The sites' view of a federated run (summary.json's final): the global prompt on the training
# sites' own test images, each site's personalized prompt on the same images, the global prompt
# on the held-out sites. Federated only. Personalized and unseen-site accuracy enter the table
# where some run reported them, and the global prompt at the same sites then stands beside them.
SITE_METRICS: tuple[tuple[str, str], ...] = (
    ("federated_accuracy", "global (sites)"),
    ("personalized_accuracy", "personalized"),
    ("unseen_site_accuracy", "unseen sites"),
)
SITE_KEYS = frozenset(key for key, _ in SITE_METRICS)
# What a clinician asks beside accuracy (summary.json's final.per_class and final.ece): the mean
# over classes of each class's sensitivity, and the expected calibration error; centralized and
# federated columns, where some run reported them (under base-to-novel, on the base classes).
MEAN_SENSITIVITY = "mean_sensitivity"
CLINICAL_METRICS: tuple[tuple[str, str], ...] = (
    (MEAN_SENSITIVITY, "mean sensitivity"),
    ("ece", "ECE"),
)
CLINICAL_KEYS = frozenset(key for key, _ in CLINICAL_METRICS)
PER_SITE_PLOT = "per_site_accuracy.png"
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
    "partition",
    "personalization",
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
    partitions: tuple[str, ...] = ()
    """Federated partitions, ``NAME`` or ``NAME+ACQUISITION`` (``dirichlet+scanner``); none
    given: the experiment's own, with no folder or override of its own."""
    personalizations: tuple[str, ...] = ()
    """Federated personalization schemes; none given: the experiment's own."""


def _axis(values: tuple[str, ...]) -> tuple[str | None, ...]:
    """An optional axis's values; ``None`` stands for the experiment's own choice."""
    return values or (None,)


def _list(text: str, option: str, what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise GridError(f"{option} is empty; name at least one {what}.")
    return names


def _names(text: str | None, group: str, default: str) -> tuple[str, ...]:
    if text is None:
        return (default,)
    return _choices(_list(text, f"--{group}s", group), group)


def _choices(names: tuple[str, ...], group: str) -> tuple[str, ...]:
    choices = list_choices(group)
    for name in names:
        if name not in choices:
            raise GridError(f"Unknown {group} {name!r}; choose from {', '.join(choices)}.")
    return names


def _partitions(text: str) -> tuple[str, ...]:
    """``--partitions``: partition configs, each optionally ``+`` a simulated acquisition."""
    specs = _list(text, "--partitions", "partition")
    scanners = [kind for kind in ACQUISITIONS if kind != "none"]
    for spec in specs:
        name, plus, acquisition = spec.partition("+")
        _choices((name,), "partition")
        if plus and acquisition not in scanners:
            raise GridError(
                f"--partitions {spec!r}: after + comes a partition.acquisition "
                f"({', '.join(scanners)}); write e.g. {name}+scanner, or {name} alone."
            )
    return specs


def partition_overrides(spec: str) -> tuple[str, ...]:
    """``dirichlet+scanner`` -> ``partition=dirichlet partition.acquisition=scanner``."""
    name, _, acquisition = spec.partition("+")
    scanner = (f"partition.acquisition={acquisition}",) if acquisition else ()
    return (f"partition={name}", *scanner)


@functools.cache
def _group_keys(group: str, name: str) -> frozenset[str]:
    """The keys a config group's choice declares (``configs/partition/dirichlet.yaml``)."""
    return frozenset(str(key) for key in OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml"))


def _group_key(override: str) -> tuple[str, str]:
    """``partition.alpha=0.3`` -> (``partition``, ``alpha``); a key outside a group: ("", "")."""
    group, _, sub = bare_key(override.partition("=")[0]).partition(".")
    return (group, sub.split(".")[0]) if group in AXIS_GROUPS and sub else ("", "")


def fitting_overrides(
    overrides: Sequence[str], choices: Mapping[str, str | None]
) -> tuple[str, ...]:
    """The overrides that apply to a point whose groups are ``choices``.

    A key of a crossed group (``partition.alpha``) goes only where the point's choice declares
    it; a group whose choice is None (the experiment's own) takes every override, as before.
    """
    kept = []
    for text in overrides:
        group, key = _group_key(text)
        name = choices.get(group)
        if name is None or key in _group_keys(group, name.partition("+")[0]):
            kept.append(text)
    return tuple(kept)


def _check_axis_overrides(
    overrides: Sequence[str], partitions: tuple[str, ...], personalizations: tuple[str, ...]
) -> None:
    """Every override of a crossed group's key must reach at least one of its choices."""
    crossed = {"partition": partitions, "personalization": personalizations}
    for text in overrides:
        group, key = _group_key(text)
        if not group or not crossed[group]:
            continue
        if group == "partition" and key == "acquisition":
            raise GridError(
                "With --partitions, give scanners in the partition's name (dirichlet+scanner); "
                f"drop the override {text}."
            )
        names = crossed[group]
        if not any(key in _group_keys(group, name.partition("+")[0]) for name in names):
            raise GridError(
                f"{text} sets a key that none of the table's {group} choices ({', '.join(names)}) "
                f"has; drop it or add a {group} that has {group}.{key}."
            )


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
    partitions: str | None = None,
    personalization: str | None = None,
) -> TableGrid:
    """The grid the ``fedprompt table`` options describe, checked before anything runs.

    Methods and datasets default to the experiment's; ``shots`` and ``seeds`` are comma lists;
    ``recipe`` applies to the centralized cells only, so they can be set beside the papers;
    ``partitions`` (``iid,dirichlet+scanner``) and ``personalization`` (schemes) cross the
    federated cells only.

    Raises:
        GridError: An unknown method, dataset, recipe, partition or scheme, a bad number, no
            protocol, an override of a key the table sets itself or of a key none of the crossed
            choices has, or a sweep among the overrides.
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
                f"{key} has several values; a table crosses only its own options (--methods, "
                "--datasets, --shots, --seeds, --partitions, --personalization): give one value."
            )
    if recipe is not None and recipe not in list_choices("recipe"):
        offered = ", ".join(list_choices("recipe")) or "none (configs/recipe/ is empty or absent)"
        raise GridError(f"Unknown recipe {recipe!r}; choose from {offered}.")
    crossed_partitions = () if partitions is None else _partitions(partitions)
    schemes = ()
    if personalization is not None:
        schemes = _choices(_list(personalization, "--personalization", "scheme"), "personalization")
    _check_axis_overrides(overrides, crossed_partitions, schemes)
    cfg = compose_config(experiment, fitting_overrides(overrides, CENTRAL_CHOICES))
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
        partitions=crossed_partitions,
        personalizations=schemes,
    )


def table_points(grid: TableGrid, overrides: Sequence[str]) -> list[Point]:
    """Every run of the table, central and federated; the user's overrides come first.

    ``grid.recipe`` goes to the centralized points only: they are the ones the papers report,
    while the federated points keep the experiment's federated settings. The centralized point
    of a cell is run once, whatever the partitions and schemes its federated points cross.
    """
    points = []
    crossed = itertools.product(grid.datasets, grid.methods, grid.protocols, grid.seeds)
    for dataset, method, protocol, seed in crossed:
        cell = _CellKey(dataset, method, protocol, seed)
        points.append(_point(cell, "central", None, None, overrides, grid.recipe))
        for partition, scheme in itertools.product(
            _axis(grid.partitions), _axis(grid.personalizations)
        ):
            points.append(_point(cell, "federated", partition, scheme, overrides, None))
    return points


@dataclass(frozen=True)
class _CellKey:
    """What a centralized point and its federated points share."""

    dataset: str
    method: str
    protocol: Protocol
    seed: int


def _point(
    cell: _CellKey,
    setting: str,
    partition: str | None,
    scheme: str | None,
    overrides: Sequence[str],
    recipe: str | None,
) -> Point:
    protocol = cell.protocol
    shots = f" ({protocol.shots} shots)" if protocol.name == BASE_TO_NOVEL else ""
    if setting == "central":
        fitted = fitting_overrides(overrides, CENTRAL_CHOICES)
        # One site cannot hold any out; the federated points keep the user's held-out sites.
        holdout = value_of(overrides, HOLDOUT_SITES) not in (None, "0")
        own = ((f"{HOLDOUT_SITES}=0",) if holdout else ()) + SETTINGS[setting]
        own += (f"recipe={recipe}",) if recipe else ()
    else:
        fitted = fitting_overrides(overrides, {"partition": partition, "personalization": scheme})
        own = partition_overrides(partition) if partition else ()
        own += (f"personalization={scheme}",) if scheme else ()
    axes = (("partition", partition), ("personalization", scheme))
    folders = "".join(f"/{name}-{folder_name(value)}" for name, value in axes if value)
    words = "".join(f" {name}={value}" for name, value in axes if value)
    return Point(
        name=f"{cell.dataset}/{cell.method}/{protocol.folder}/{setting}{folders}/seed-{cell.seed}",
        overrides=(
            *fitted,
            f"dataset={cell.dataset}",
            f"method={cell.method}",
            *protocol.overrides(),
            f"seed={cell.seed}",
            *own,
        ),
        labels={
            "dataset": cell.dataset,
            "method": cell.method,
            "protocol": protocol.name,
            "shots": protocol.shots,
            "setting": setting,
            "seed": cell.seed,
            "partition": partition,
            "personalization": scheme,
        },
        description=(
            f"{cell.dataset} {cell.method} {protocol.label}{shots} {setting}{words} "
            f"seed={cell.seed}"
        ),
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
    scheme = point.labels.get("personalization")
    if scheme not in (None, "none") and final.get("personalized_accuracy") is None:
        return (
            f"its summary.json has no final.personalized_accuracy, so personalization={scheme} "
            "did not run; its numbers cannot enter the table's row."
        )
    return None


def result_words(summary: Mapping[str, Any]) -> str:
    """The progress line's numbers: accuracy, or base, novel and HM; the sites' view if any."""
    final = summary.get("final") or {}
    protocol = (summary.get("protocol") or {}).get("name")
    keys = METRICS[BASE_TO_NOVEL] if protocol == BASE_TO_NOVEL else METRICS[FEW_SHOT]
    keys += SITE_METRICS[1:]
    return (
        ", ".join(
            f"{label} {100 * final[key]:.1f}%" for key, label in keys if final.get(key) is not None
        )
        or "no accuracy reported"
    )


@dataclass(frozen=True)
class Cell:
    """One metric of one setting over seeds: the values (percent) and how many seeds failed.

    ``absent`` counts finished runs that did not compute the metric (personalized accuracy
    without a scheme), so such a cell reads ``-`` rather than a number or a failure.
    """

    values: tuple[float, ...]
    failed: int
    absent: int = 0

    def stats(self) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation over seeds (None where undefined)."""
        return mean_and_std(self.values)

    def text(self) -> str:
        """``mean ± std`` (sample std; the mean alone for one seed), failures marked."""
        mean, std = self.stats()
        if mean is None:
            return "failed" if self.failed else "-" if self.absent else "not run"
        shown = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
        notes = [f"{self.failed} failed"] if self.failed else []
        notes += [f"{self.absent} not reported"] if self.absent else []
        return f"{shown} ({', '.join(notes)})" if notes else shown


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
    """One metric of a method on a dataset under a protocol, centralized and federated.

    A row of the sites' view (``SITE_METRICS``) has a federated cell only. ``partition`` and
    ``personalization`` name the federated cells' choices where the table crosses them.
    """

    dataset: str
    method: str
    protocol: Protocol
    metric: str
    label: str
    cells: dict[str, Cell]
    published: Published | None = None
    partition: str | None = None
    personalization: str | None = None

    def diff(self) -> float | None:
        """Centralized mean minus the published number, in points; None without either."""
        central = self.cells.get("central")
        mean = None if central is None else central.stats()[0]
        return None if mean is None or self.published is None else mean - self.published.value

    @property
    def identity(self) -> tuple[str, str | None, str | None]:
        """What the row is of: method, partition, personalization (a markdown table's row)."""
        return self.method, self.partition, self.personalization


def final_value(final: Mapping[str, Any], metric: str) -> float | None:
    """A table metric (a fraction) from a run's ``final``, None where the run did not report it.

    ``mean_sensitivity`` is the mean of the per-class sensitivities the run could compute (the
    classes its test split holds), from ``final.per_class``.
    """
    if metric == MEAN_SENSITIVITY:
        return mean_sensitivity(final.get("per_class"))
    value = final.get(metric)
    return None if value is None else float(value)


def _cell(metric: str, runs: Sequence[Outcome]) -> Cell:
    """A row's cell from the runs of one setting; HM of means from their base and novel."""
    finished = [run.summary["final"] for run in runs if run.summary is not None]
    failed = len(runs) - len(finished)
    source = HM_OF_MEANS if metric == HM_PER_SEED else metric
    reported = [final_value(f, source) for f in finished]
    values = tuple(100.0 * value for value in reported if value is not None)
    if metric != HM_OF_MEANS:
        return Cell(values, failed, absent=len(finished) - len(values))
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
            labels.get("partition"),
            labels.get("personalization"),
        )
        by_cell.setdefault(key, []).append(outcome)
    site_metrics = _site_metrics(outcomes)
    clinical = _clinical_metrics(outcomes)
    rows = []
    crossed = itertools.product(
        grid.datasets,
        grid.methods,
        grid.protocols,
        _axis(grid.partitions),
        _axis(grid.personalizations),
    )
    for dataset, method, protocol, partition, scheme in crossed:
        cell = (dataset, method, protocol.name, protocol.shots)
        runs = {
            "central": by_cell.get((*cell, "central", None, None), []),
            "federated": by_cell.get((*cell, "federated", partition, scheme), []),
        }
        for metric, label in (*TABLE_METRICS[protocol.name], *clinical):
            cells = {setting: _cell(metric, runs[setting]) for setting in SETTINGS}
            paper = (published or {}).get((*cell, metric))
            rows.append(
                TableRow(dataset, method, protocol, metric, label, cells, paper, partition, scheme)
            )
        rows += [
            TableRow(
                dataset,
                method,
                protocol,
                metric,
                label,
                {"federated": _cell(metric, runs["federated"])},
                None,
                partition,
                scheme,
            )
            for metric, label in site_metrics
        ]
    return rows + _average_rows(grid, rows, published or {})


def _site_metrics(outcomes: Sequence[Outcome]) -> list[tuple[str, str]]:
    """The sites' view the table shows: what some federated run reported, and the comparison.

    Personalized and unseen-site accuracy each appear where some run reported them; the global
    prompt on the training sites' own test images then stands beside them.
    """
    finals = [
        outcome.summary.get("final") or {}
        for outcome in outcomes
        if outcome.summary is not None and outcome.point.labels.get("setting") == "federated"
    ]
    reported = [
        (key, label)
        for key, label in SITE_METRICS[1:]
        if any(final.get(key) is not None for final in finals)
    ]
    return [SITE_METRICS[0], *reported] if reported else []


def _clinical_metrics(outcomes: Sequence[Outcome]) -> tuple[tuple[str, str], ...]:
    """Mean sensitivity and ECE where some run reported them (runs made before did not)."""
    finals = [(o.summary or {}).get("final") or {} for o in outcomes if o.summary is not None]
    return tuple(
        (key, label)
        for key, label in CLINICAL_METRICS
        if any(final_value(final, key) is not None for final in finals)
    )


def _average_rows(
    grid: TableGrid, rows: Sequence[TableRow], published: Mapping[PublishedKey, Published]
) -> list[TableRow]:
    """The papers' cross-dataset averages, where the grid holds every dataset they average."""
    averages = []
    for name, (family, datasets) in AVERAGED.items():
        if not set(datasets) <= set(grid.datasets):
            continue
        identities = dict.fromkeys(row.identity for row in rows)
        for (method, partition, scheme), protocol in itertools.product(identities, grid.protocols):
            if protocol.name != family:
                continue
            for metric, label in TABLE_METRICS[family]:
                members = [
                    row
                    for row in rows
                    if (*row.identity, row.protocol, row.metric)
                    == (method, partition, scheme, protocol, metric)
                    and row.dataset in datasets
                ]
                cells: dict[str, Cell] = {
                    setting: AverageCell.over([row.cells[setting] for row in members])
                    for setting in SETTINGS
                }
                paper = published.get((name, method, protocol.name, protocol.shots, metric))
                averages.append(
                    TableRow(name, method, protocol, metric, label, cells, paper, partition, scheme)
                )
    return averages


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_csv(rows: Sequence[TableRow], path: Path) -> Path:
    """One line per dataset x method x partition x scheme x protocol x metric; in percent.

    ``partition`` and ``personalization`` are empty where the table does not cross them (the
    experiment's own). A setting a metric does not apply to (the centralized cells of the sites'
    view) is left empty. ``paper_pct``, ``diff_pts`` (centralized mean minus paper) and
    ``paper_source`` are filled where a paper reports the cell.
    """
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            line: list[Any] = [
                row.dataset,
                row.method,
                row.partition or "",
                row.personalization or "",
                row.protocol.name,
                row.protocol.shots,
                row.metric,
            ]
            for setting in SETTINGS:
                cell = row.cells.get(setting)
                if cell is None:
                    line += ["", "", "", ""]
                    continue
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
    if row.metric in SITE_KEYS:
        return [row.cells["federated"].text()]
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

    A column some paper reports gets ``paper`` and ``diff`` beside its centralized cells; the
    sites' view has federated columns only. Where the table crosses partitions or schemes, each
    is a row of its own, named in a column.
    """
    identities = list(dict.fromkeys(row.identity for row in rows))
    named = [
        (index, axis)
        for index, axis in ((1, "partition"), (2, "personalization"))
        if any(identity[index] is not None for identity in identities)
    ]
    columns = list(dict.fromkeys((row.protocol, row.metric, row.label) for row in rows))
    reported = {(row.protocol, row.metric) for row in rows if row.published is not None}
    heads = [axis for _, axis in named]
    for protocol, metric, label in columns:
        if metric in SITE_KEYS:
            heads.append(f"{protocol.label} {label}")
            continue
        if protocol.name == FEW_SHOT:
            words = protocol.label if metric == "accuracy" else f"{protocol.label} {label}"
        else:
            words = f"{label} (base)" if metric in CLINICAL_KEYS else label
        extra = ("paper", "diff") if (protocol, metric) in reported else ()
        heads += [f"{words} {where}" for where in ("central", *extra, "federated")]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    by_key = {(row.identity, row.protocol, row.metric): row for row in rows}
    for identity in identities:
        texts = [str(identity[index]) for index, _ in named]
        texts += [
            text
            for protocol, metric, _ in columns
            for text in _row_texts(
                by_key[(identity, protocol, metric)], (protocol, metric) in reported
            )
        ]
        lines.append(f"| {identity[0]} | " + " | ".join(texts) + " |")
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


def markdown(
    rows: Sequence[TableRow], grid: TableGrid, about: str, plot: Path | None = None
) -> str:
    """``table.md``: per dataset, a few-shot table and a base-to-novel table.

    ``plot``, the per-site accuracy figure where one was drawn, is named under the legend.
    """
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
    if any(row.metric in CLINICAL_KEYS for row in rows):
        lines += [
            "",
            "Beside accuracy, on the same test split: 'mean sensitivity' is the mean over "
            "classes of each class's sensitivity (recall; classes absent from the split left "
            "out), 'ECE' the expected calibration error over 15 equal-width confidence bins "
            "(lower is better: 0 when the model is right as often as it is confident); "
            "base-to-novel: on the base classes.",
        ]
    if any(row.metric in SITE_KEYS for row in rows):
        lines += [
            "",
            "The sites' view, federated runs only: 'global (sites)' is the global prompt on "
            "the training sites' own test images, 'personalized' each site's own prompt on the "
            "same images, 'unseen sites' the global prompt on the held-out sites (all weighted "
            "by test images); '-' where a run does not compute it (no scheme, no held-out site).",
        ]
    if grid.partitions or grid.personalizations:
        lines += [
            "",
            "The centralized cells (one site: nothing to partition or personalize) are run once "
            "and repeated on every partition and personalization row of their method.",
        ]
    if plot is not None:
        lines += ["", f"Each site's global and personalized accuracy: `{plot.name}`."]
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


def describe_settings(
    cfg: DictConfig, recipe: str | None = None, partitions: Sequence[str] = ()
) -> str:
    """The settings every cell shares, in one sentence for the top of ``table.md``.

    ``cfg`` is a federated point's; ``partitions``, where crossed, replace its partition's name.
    """
    recipe_words = f" under recipe={recipe}" if recipe else ""
    holdout = int(cfg.evaluation.get("holdout_sites") or 0)
    held_out = f", the last {holdout} held out of training as unseen sites" if holdout else ""
    partition = "the row's partition" if partitions else f"{cfg.partition.name} partition"
    return (
        f"Backbone {cfg.backbone.name}, {cfg.federation.rounds} rounds of "
        f"{cfg.train.local_epochs} local epochs; central: one site holding the whole training "
        f"split{recipe_words}; federated: {cfg.federation.num_sites} sites "
        f"({partition}, {cfg.strategy.name}){held_out}. K shots are K images per class at each "
        "site, drawn from what the site holds."
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
    words += ["--partitions", ",".join(grid.partitions)] if grid.partitions else []
    if grid.personalizations:
        words += ["--personalization", ",".join(grid.personalizations)]
    words += ["--seeds", ",".join(str(seed) for seed in grid.seeds), *overrides]
    return " ".join(words)


def site_panels(outcomes: Sequence[Outcome]) -> dict[str, list[Mapping[str, Any]]]:
    """The federated runs with personalized accuracy, as ``plots.per_site_accuracy`` takes them.

    One panel per method (and dataset, protocol, partition and scheme where the table has
    several), each holding every seed's ``final.per_site``.
    """
    grouped: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for outcome in outcomes:
        final = (outcome.summary or {}).get("final") or {}
        if final.get("personalized_accuracy") is None or not final.get("per_site"):
            continue
        labels = outcome.point.labels
        protocol = Protocol(labels["protocol"], labels["shots"]).label
        key = (
            labels["method"],
            labels["dataset"],
            protocol,
            labels.get("partition"),
            labels.get("personalization"),
        )
        grouped.setdefault(key, []).append(final["per_site"])
    varying = [len({key[i] for key in grouped}) > 1 for i in range(5)]
    return {
        ", ".join(
            str(part)
            for i, part in enumerate(key)
            if part is not None and (i == 0 or i >= 3 or varying[i])
        ): runs
        for key, runs in grouped.items()
    }


def run_table(
    experiment: str,
    grid: TableGrid,
    overrides: Sequence[str],
    out: Path,
    runner: PointRunner | None = None,
) -> tuple[list[Outcome], Path, Path, Path | None]:
    """Run the table's points not yet finished under ``out`` and write its files.

    Returns:
        The outcomes, the paths of ``table.md`` and ``table.csv``, and that of the per-site
        accuracy plot, drawn where some run has personalized accuracy (else None).

    Raises:
        GridError: ``out`` holds a different study, or a point's folder another run.
    """
    points = table_points(grid, overrides)
    federated = next(point for point in points if point.labels["setting"] == "federated")
    cfg = compose_config(experiment, federated.overrides)
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
    panels = site_panels(outcomes)
    plot = out / PER_SITE_PLOT if panels else None
    if plot is not None:
        per_site_accuracy(panels, plot, title="Each site: global against personalized prompt")
    settings = describe_settings(cfg, grid.recipe, grid.partitions)
    about = f"`{command_line(experiment, grid, overrides)}`. {settings}"
    markdown_path = out / "table.md"
    markdown_path.write_text(markdown(rows, grid, about, plot), encoding="utf-8")
    return outcomes, markdown_path, write_csv(rows, out / "table.csv"), plot
