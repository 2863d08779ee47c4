"""``fedprompt study privacy``: accuracy, calibration and membership inference against the budget.

A Hydra multirun underneath: the overrides are Hydra's sweep grammar (``privacy.epsilon=inf,8,4
seed=1,2 partition=iid,dirichlet``), expanded into their cartesian product as Hydra's
BasicSweeper does. ``privacy.epsilon=inf`` is a run without DP (``privacy=none``); a finite one is
sample-level DP-SGD at each site with that budget for the whole run (``privacy=dpsgd``). Every run
also measures the loss-threshold membership-inference AUC at each site. ``personalization=`` is an
ordinary override (one scheme, or a sweep such as ``personalization=none,finetune``); where runs
report personalized accuracy, the CSV and the table give it beside the accuracy; where runs report
them, so are the mean per-class sensitivity and the expected calibration error (noise can leave a
prompt as accurate but over- or under-confident), and ECE is plotted against epsilon.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprompt.config import check_group_choices, compose_config
from fedprompt.evaluation.metrics import mean_sensitivity
from fedprompt.evaluation.plots import (
    StudyPoint,
    accuracy_per_round,
    accuracy_vs_epsilon,
    metric_vs_epsilon,
    round_accuracies,
)
from fedprompt.experiments.grid import (
    GridError,
    Outcome,
    Point,
    PointRunner,
    bare_key,
    check_points,
    expand_sweep,
    folder_name,
    mean_and_std,
    open_study,
    parse_sweep,
    read_metrics,
    run_grid,
    value_of,
)

DEFAULT_EPSILONS = "inf,8,4,2,1"
EPSILON = "privacy.epsilon"
# The study's own axes: every point is named and grouped by them, swept or not.
AXES = ("method", "partition", "seed", EPSILON)
STUDY_OVERRIDES = ("evaluation.membership_inference=true",)
CSV_COLUMNS = (
    "method",
    "partition",
    "seed",
    "epsilon_target",
    "epsilon_reached",
    "accuracy_pct",
    "mia_auc",
    "dataset",
    "status",
    "folder",
)


def _epsilon(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise GridError(f"privacy.epsilon={text} is not a budget; give positive numbers or inf.")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise GridError(f"seed={text} is not an integer; give seeds such as seed=1,2,3.") from None


def _epsilon_words(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def privacy_points(experiment: str, overrides: Sequence[str]) -> tuple[list[Point], list[str]]:
    """Every point of the sweep, and the settings all of them share (the study's identity).

    Raises:
        GridError: A sweep that does not parse, a budget that is not a positive number or inf,
            an unknown config-group choice, or ``privacy=`` given (the budget chooses it).
    """
    sweep = parse_sweep(overrides)
    if any(bare_key(key) == "privacy" for key in sweep):
        raise GridError(
            "The study chooses privacy= from the budget; give privacy.epsilon=inf,8,4,... "
            "(inf: no DP, a number: DP-SGD at each site with that epsilon)."
        )
    if not any(bare_key(key) == EPSILON for key in sweep):
        sweep = {**sweep, **parse_sweep([f"{EPSILON}={DEFAULT_EPSILONS}"])}
    swept = [key for key, values in sweep.items() if len(values) > 1]
    extras = [key for key in swept if bare_key(key) not in AXES]
    shared = sorted(
        values[0] for key, values in sweep.items() if key not in swept and bare_key(key) not in AXES
    )
    base = compose_config(experiment, shared)  # defaults of the axes, and a bad key stops here
    points = []
    for combination in expand_sweep(sweep):
        check_group_choices(combination)
        budget = value_of(combination, EPSILON) or ""
        epsilon = _epsilon(budget)
        labels: dict[str, Any] = {
            "method": value_of(combination, "method") or str(base.method.name),
            "partition": value_of(combination, "partition") or str(base.partition.name),
            "seed": _seed(value_of(combination, "seed") or str(base.seed)),
            "epsilon": _epsilon_words(epsilon),
            "extras": {bare_key(key): value_of(combination, bare_key(key)) for key in extras},
        }
        privacy = (
            ("privacy=none",) if math.isinf(epsilon) else ("privacy=dpsgd", f"{EPSILON}={budget}")
        )
        settings = [text for text in combination if bare_key(text.partition("=")[0]) != EPSILON]
        extra_words = [f"{key}={value}" for key, value in labels["extras"].items()]
        name_parts = [
            labels["method"],
            labels["partition"],
            *extra_words,
            f"eps-{labels['epsilon']}",
            f"seed-{labels['seed']}",
        ]
        points.append(
            Point(
                name="/".join(folder_name(part) for part in name_parts),
                overrides=(*STUDY_OVERRIDES, *settings, *privacy),
                labels=labels,
                description=" ".join(
                    [
                        f"method={labels['method']}",
                        f"partition={labels['partition']}",
                        *extra_words,
                        f"seed={labels['seed']}",
                        f"epsilon={labels['epsilon']}",
                    ]
                ),
            )
        )
    return points, shared


def reached_epsilon(summary: Mapping[str, Any]) -> float | None:
    """The largest epsilon any site spent, from ``summary.json``'s per-site privacy record."""
    privacy = summary.get("privacy")
    if not privacy:
        return None
    spent = [
        float(site["epsilon"])
        for site in privacy.values()
        if isinstance(site, Mapping) and site.get("epsilon") is not None
    ]
    return max(spent) if spent else None


def check_summary(point: Point, summary: Mapping[str, Any]) -> str | None:
    """A finite budget must have been spent under DP, an infinite one without, else why not."""
    private = point.labels["epsilon"] != "inf"
    if private and reached_epsilon(summary) is None:
        return (
            "its summary.json records no privacy spending, so the run was not private; "
            "its accuracy cannot stand for this budget."
        )
    if not private and summary.get("privacy"):
        return "its summary.json records DP spending for a run meant to be without DP."
    if (summary.get("final") or {}).get("accuracy") is None:
        return "its summary.json has no final.accuracy."
    return None


def result_words(summary: Mapping[str, Any]) -> str:
    """The progress line's numbers: accuracy (and personalized), epsilon spent, attack AUC."""
    final = summary.get("final") or {}
    words = [
        f"{label} {100 * final[key]:.1f}%"
        for key, label in (("accuracy", "accuracy"), ("personalized_accuracy", "personalized"))
        if final.get(key) is not None
    ]
    reached = reached_epsilon(summary)
    if reached is not None:
        words.append(f"epsilon reached {reached:.2f}")
    if final.get("mia_auc") is not None:
        words.append(f"MIA AUC {final['mia_auc']:.3f}")
    return ", ".join(words) or "no accuracy reported"


@dataclass(frozen=True)
class PointRow:
    """One line of ``privacy.csv``: a point and what its run reached (None where it failed)."""

    outcome: Outcome

    @property
    def labels(self) -> dict[str, Any]:
        """The point's method, partition, seed, epsilon and further swept settings."""
        return self.outcome.point.labels

    @property
    def accuracy(self) -> float | None:
        """Final central test accuracy, a fraction."""
        summary = self.outcome.summary
        return None if summary is None else float(summary["final"]["accuracy"])

    @property
    def personalized_accuracy(self) -> float | None:
        """The sites' own prompts on their own test images, weighted; None without a scheme."""
        summary = self.outcome.summary
        value = None if summary is None else summary["final"].get("personalized_accuracy")
        return None if value is None else float(value)

    @property
    def mean_sensitivity(self) -> float | None:
        """The mean over classes of the final central sensitivity; None where not reported."""
        summary = self.outcome.summary
        return None if summary is None else mean_sensitivity(summary["final"].get("per_class"))

    @property
    def ece(self) -> float | None:
        """The final expected calibration error, a fraction; None where not reported."""
        summary = self.outcome.summary
        value = None if summary is None else summary["final"].get("ece")
        return None if value is None else float(value)

    @property
    def mia_auc(self) -> float | None:
        """Mean over sites of the membership-inference AUC, where measured."""
        summary = self.outcome.summary
        value = None if summary is None else summary["final"].get("mia_auc")
        return None if value is None else float(value)

    @property
    def epsilon_reached(self) -> float | None:
        """The largest epsilon spent by any site."""
        summary = self.outcome.summary
        return None if summary is None else reached_epsilon(summary)


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _personalized(rows: Sequence[PointRow]) -> bool:
    """Some run reported personalized accuracy, so the CSV and the table get its column."""
    return any(row.personalized_accuracy is not None for row in rows)


def _clinical(rows: Sequence[PointRow]) -> bool:
    """Some run reported calibration, so the CSV and the table get mean sensitivity and ECE."""
    return any(row.ece is not None for row in rows)


def _percent(value: float | None) -> str:
    return _number(None if value is None else 100 * value, 2)


def write_csv(rows: Sequence[PointRow], path: Path) -> Path:
    """One line per point; accuracy in percent, epsilon reached the largest over sites.

    ``personalized_accuracy_pct`` follows ``accuracy_pct`` where some run reported it (empty for
    the runs without a scheme), then ``mean_sensitivity_pct`` and ``ece_pct`` where some run
    reported calibration.
    """
    extras = list(dict.fromkeys(key for row in rows for key in row.labels["extras"]))
    personalized, clinical = _personalized(rows), _clinical(rows)
    after = CSV_COLUMNS.index("accuracy_pct") + 1
    own_column = ["personalized_accuracy_pct"] if personalized else []
    own_column += ["mean_sensitivity_pct", "ece_pct"] if clinical else []
    columns = [*CSV_COLUMNS[:after], *own_column, *CSV_COLUMNS[after:]]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns[:3], *extras, *columns[3:]])
        for row in rows:
            labels, outcome = row.labels, row.outcome
            summary = outcome.summary or {}
            writer.writerow(
                [
                    labels["method"],
                    labels["partition"],
                    labels["seed"],
                    *(labels["extras"].get(key, "") for key in extras),
                    labels["epsilon"],
                    _number(row.epsilon_reached, 4),
                    _percent(row.accuracy),
                    *([_percent(row.personalized_accuracy)] if personalized else []),
                    *([_percent(row.mean_sensitivity), _percent(row.ece)] if clinical else []),
                    _number(row.mia_auc, 4),
                    summary.get("dataset", ""),
                    "ok" if outcome.ok else f"failed: {outcome.error}",
                    str(outcome.folder),
                ]
            )
    return path


def _group_key(row: PointRow) -> tuple[Any, ...]:
    labels = row.labels
    return (
        labels["method"],
        labels["partition"],
        tuple(labels["extras"].items()),
        labels["epsilon"],
    )


def _mean_std_text(values: Sequence[float], scale: float, digits: int) -> str:
    mean, std = mean_and_std([scale * value for value in values])
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(rows: Sequence[PointRow], about: str) -> str:
    """``privacy.md``: mean ± sample std over seeds per method x partition x epsilon."""
    groups: dict[tuple[Any, ...], list[PointRow]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    # Rows by method, partition and setting, each in the order the sweep gave, then by budget.
    order = [list(dict.fromkeys(key[i] for key in groups)) for i in range(4)]
    ranked = sorted(groups, key=lambda key: tuple(order[i].index(key[i]) for i in range(4)))
    extras = list(dict.fromkeys(key for row in rows for key in row.labels["extras"]))
    personalized, clinical = _personalized(rows), _clinical(rows)
    heads = [
        "method",
        "partition",
        *extras,
        "epsilon target",
        "epsilon reached (max)",
        "accuracy (%)",
        *(["personalized accuracy (%)"] if personalized else []),
        *(["mean sensitivity (%)", "ECE (%)"] if clinical else []),
        "MIA AUC",
        "seeds",
    ]
    lines = [
        "# fedprompt privacy study",
        "",
        about,
        "",
        "Accuracy: the global prompt on the whole test split after the last round. Epsilon "
        "reached: the largest any site spent over the whole run, largest over seeds. MIA AUC: "
        "loss-threshold membership inference, mean over sites (0.5 is chance). Mean ± sample "
        "standard deviation over seeds."
        + (
            " Personalized accuracy: each site's own prompt on its own test images, weighted by "
            "their number ('-' for a run without a personalization scheme)."
            if personalized
            else ""
        )
        + (
            " Mean sensitivity: each class's sensitivity (recall) on the test split, averaged "
            "over classes. ECE: expected calibration error over 15 equal-width confidence bins "
            "(0 when the model is right as often as it is confident)."
            if clinical
            else ""
        ),
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for method, partition, extra_items, epsilon in ranked:
        members = groups[(method, partition, extra_items, epsilon)]
        finished = [row for row in members if row.outcome.ok]
        failed = len(members) - len(finished)
        reached = [row.epsilon_reached for row in finished if row.epsilon_reached is not None]
        seeds = f"{len(finished)}" + (f" ({failed} failed)" if failed else "")
        accuracy = _mean_std_text([r.accuracy for r in finished if r.accuracy is not None], 100, 1)
        attack = _mean_std_text([r.mia_auc for r in finished if r.mia_auc is not None], 1, 3)
        own = [r.personalized_accuracy for r in finished if r.personalized_accuracy is not None]
        own_text = _mean_std_text(own, 100, 1) if own else "-"
        calibration = [
            _mean_std_text([v for r in finished if (v := getattr(r, key)) is not None], 100, 1)
            for key in ("mean_sensitivity", "ece")
        ]
        cells = [
            method,
            partition,
            *(dict(extra_items).get(key, "") for key in extras),
            epsilon,
            f"{max(reached):.2f}" if reached else "-",
            "failed" if not finished else accuracy,
            *(["failed" if not finished else own_text] if personalized else []),
            *((["failed"] * 2 if not finished else calibration) if clinical else []),
            "failed" if not finished else attack,
            seeds,
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _line_label(row: PointRow, partitions: int) -> str:
    """Plot label of a point's method, with the partition and other settings where they vary."""
    parts = [row.labels["method"]]
    if partitions > 1:
        parts.append(row.labels["partition"])
    parts += [f"{key}={value}" for key, value in row.labels["extras"].items()]
    return " / ".join(parts)


def write_plots(rows: Sequence[PointRow], plots: Path) -> list[Path]:
    """Accuracy, attack AUC and ECE against epsilon, and accuracy per round per setting.

    Points are placed at their target epsilon, so seeds of one budget share an error bar; the
    epsilon each run reached is in the CSV and the table.
    """
    finished = [row for row in rows if row.outcome.ok and row.accuracy is not None]
    if not finished:
        return []
    partitions = len({row.labels["partition"] for row in rows})
    study_points = [
        StudyPoint(
            method=_line_label(row, partitions),
            epsilon=float(row.labels["epsilon"]),
            seed=int(row.labels["seed"]),
            accuracy=float(row.accuracy or 0.0),
            mia_auc=row.mia_auc,
            ece=row.ece,
        )
        for row in finished
    ]
    written = [plots / "accuracy_vs_epsilon.png"]
    accuracy_vs_epsilon(study_points, written[0], title="Accuracy against the privacy budget")
    if any(point.mia_auc is not None for point in study_points):
        written.append(plots / "mia_auc_vs_epsilon.png")
        metric_vs_epsilon(study_points, written[-1], metric="mia_auc", title="Membership inference")
    if any(point.ece is not None for point in study_points):
        written.append(plots / "ece_vs_epsilon.png")
        metric_vs_epsilon(study_points, written[-1], metric="ece", title="Calibration")
    by_setting: dict[str, dict[str, list[list[tuple[int, float]]]]] = {}
    for row in finished:
        budget = "no DP" if row.labels["epsilon"] == "inf" else f"epsilon={row.labels['epsilon']}"
        series = round_accuracies(read_metrics(row.outcome.folder))
        by_setting.setdefault(_line_label(row, 2), {}).setdefault(budget, []).append(series)
    for setting, runs in by_setting.items():
        if not any(series for budget in runs.values() for series in budget):
            continue
        path = plots / f"accuracy_per_round-{folder_name(setting.replace(' / ', '-'))}.png"
        accuracy_per_round(runs, path, title=f"{setting}: central accuracy per round")
        written.append(path)
    return written


def run_privacy_study(
    experiment: str,
    overrides: Sequence[str],
    out: Path,
    runner: PointRunner | None = None,
) -> tuple[list[Outcome], list[Path]]:
    """Run the sweep's points not yet finished under ``out``; write CSV, table and plots.

    Returns:
        The outcomes, and the paths written (``privacy.csv``, ``privacy.md``, the plots).

    Raises:
        GridError: A bad sweep, or ``out`` holding a different study.
    """
    points, shared = privacy_points(experiment, overrides)
    if not points:
        raise GridError("The sweep is empty; give at least one value for every key.")
    if runner is None:
        check_points(experiment, points)
    open_study(out, {"command": "study privacy", "experiment": experiment, "settings": shared})
    outcomes = run_grid(
        experiment, points, out, runner=runner, result=result_words, check=check_summary
    )
    rows = [PointRow(outcome) for outcome in outcomes]
    about = f"`{' '.join(['fedprompt study privacy', experiment, *overrides])}`"
    written = [write_csv(rows, out / "privacy.csv"), out / "privacy.md"]
    written[1].write_text(markdown(rows, about), encoding="utf-8")
    return outcomes, written + write_plots(rows, out / "plots")
