"""A grid of runs: Hydra sweep expansion, one results folder per point, resume, mean and std.

Each point is a real run through Flower's simulation engine (``local_simulation.simulate``, the
same call as ``fedprompt simulate``) writing its own results folder under the study folder. A
point whose ``summary.json`` says it completed is not run again, so repeating a command resumes it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from fedprompt.config import ConfigError, compose_config
from fedprompt.config_schema import check_config

STUDY_FILE = "study.json"
SESSION_PLAN = "session-plan.json"
POINT_FILE = "point.json"
FLOWER_LOG = "flower.log"
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C
PointRunner = Callable[[str, Sequence[str], Path], None]
SummaryCheck = Callable[["Point", Mapping[str, Any]], str | None]


class GridError(ConfigError):
    """A grid that cannot run as given; the message says what to change."""


class PointFailed(RuntimeError):
    """One point did not finish; the message is one sentence saying why and where to look."""


# ---------------------------------------------------------------- sweeps (Hydra's grammar)


def parse_sweep(overrides: Sequence[str]) -> dict[str, list[str]]:
    """Each key of ``overrides`` and the override strings it takes, one per value.

    Parsed by Hydra's own override parser, expanded as Hydra's BasicSweeper does: a choice sweep
    (``seed=1,2``, ``choice(...)``, ``range(1,4)``) gives one override per value, a later
    override of the same key replaces an earlier one in its place, and a plain override is kept
    verbatim.

    Raises:
        GridError: An override that does not parse, or a sweep without a list of values
            (``interval``, ``glob``).
    """
    parser = OverridesParser.create()
    sweep: dict[str, list[str]] = {}
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
            if override.is_sweep_override() and not override.is_discrete_sweep():
                raise HydraException("only sweeps that list their values can be run")
            key = override.get_key_element()
            if override.is_sweep_override():
                sweep[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                sweep[key] = [override.input_line or text]
        except HydraException as err:
            raise GridError(
                f"Cannot expand {text!r} ({_reason(err)}); write sweeps in Hydra's grammar, "
                "e.g. privacy.epsilon=inf,8,4 or seed=range(1,4)."
            ) from None
    return sweep


def _reason(err: HydraException) -> str:
    """The line of a Hydra parse error that says what is wrong (not the header or the link)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Error parsing override", "See "))]
    return (said or lines or ["unreadable"])[0]


def expand_sweep(sweep: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Every combination of ``parse_sweep``'s values, in BasicSweeper's (cartesian) order."""
    return [list(combination) for combination in itertools.product(*sweep.values())]


def bare_key(key: str) -> str:
    """``+seed`` / ``++seed`` / ``~seed`` -> ``seed``: the config key an override sets."""
    return key.lstrip("+~")


def value_of(overrides: Sequence[str], key: str) -> str | None:
    """The value the last override of ``key`` sets in an expanded point, if any does."""
    found = None
    for text in overrides:
        name, _, value = text.partition("=")
        if bare_key(name) == key:
            found = value
    return found


# ---------------------------------------------------------------- points and their folders


@dataclass(frozen=True)
class Point:
    """One run of a grid.

    Attributes:
        name: Its folder under the study folder (``/`` makes subfolders).
        overrides: The Hydra overrides that make this run (``output_dir`` is added when run).
        labels: What tables group and name it by (method, seed, ...).
        description: A few words for the progress line.
    """

    name: str
    overrides: tuple[str, ...]
    labels: dict[str, Any] = field(hash=False)
    description: str


@dataclass(frozen=True)
class Outcome:
    """What became of a point: its summary where it finished, else the sentence saying why not."""

    point: Point
    folder: Path
    summary: dict[str, Any] | None
    error: str | None
    seconds: float
    reused: bool

    @property
    def ok(self) -> bool:
        """The run finished and wrote its summary."""
        return self.summary is not None


def default_out(kind: str) -> Path:
    """``runs/<kind>-<date>-<time>`` under the current folder, as a run's own default."""
    return Path("runs", f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()


def folder_name(text: str) -> str:
    """A path component from a value: characters a file system or a shell minds become ``-``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-") or "-"


def check_points(experiment: str, points: Sequence[Point]) -> None:
    """Check every point's config before anything runs, the study folder included.

    Raises:
        ConfigError: The first point's problem, in one sentence.
    """
    for point in points:
        check_config(compose_config(experiment, point.overrides))


def open_study(out: Path, identity: Mapping[str, Any]) -> None:
    """Create the study folder, or check that an existing one holds this very study.

    ``identity`` names the command, experiment and fixed settings; points along the grid's own
    axes (more seeds, another method) may be added to a study, but other settings may not.

    Raises:
        GridError: ``out`` holds a different study, or other files.
    """
    marker = out / STUDY_FILE
    if marker.is_file():
        held = json.loads(marker.read_text(encoding="utf-8"))
        if held != dict(identity):
            raise GridError(
                f"{out} holds a different study ({_describe(held)}), not this one "
                f"({_describe(identity)}); give a new --out, or repeat that study's command "
                "to resume it."
            )
        return
    if out.exists() and any(out.iterdir()):
        raise GridError(f"{out} is not empty and holds no fedprompt study; give a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(dict(identity), indent=2) + "\n", encoding="utf-8")


def _describe(identity: Mapping[str, Any]) -> str:
    settings = " ".join(identity.get("settings", []))
    return " ".join(
        part
        for part in ("fedprompt", identity.get("command"), identity.get("experiment"), settings)
        if part
    )


def _summary_file(folder: Path) -> dict[str, Any] | None:
    """A run's ``summary.json`` as written, or None where there is none."""
    path = folder / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_summary(folder: Path) -> dict[str, Any] | None:
    """A completed run's ``summary.json``, or None where the run has not completed.

    A run that failed also writes one, with ``"status": "failed"``: it counts as not done, so
    repeating the grid runs it again.
    """
    summary = _summary_file(folder)
    if summary is None:
        return None
    return summary if summary.get("status", "completed") == "completed" else None


def failure_reason(folder: Path) -> str | None:
    """The reason a run's ``summary.json`` gives for its failure, if it failed."""
    summary = _summary_file(folder) or {}
    return summary.get("reason") if summary.get("status") == "failed" else None


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl`` lines (none where absent)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ---------------------------------------------------------------- running


@contextlib.contextmanager
def _process_output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr, and so its children's, go to ``path`` meanwhile.

    ``simulate`` lets ``flwr run`` print to the terminal; in a grid of dozens of runs only the
    progress lines belong there, and each run's Flower log belongs beside its results.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with path.open("ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _logged_error(log: Path) -> str | None:
    """The last ``[fedprompt]`` error sentence the ServerApp logged, if any."""
    if not log.is_file():
        return None
    found = None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        line = _ANSI.sub("", line)
        if "ERROR" in line and "[fedprompt] " in line:
            found = line.split("[fedprompt] ", 1)[1].strip()
    return found


def run_point(experiment: str, overrides: Sequence[str], folder: Path) -> None:
    """One point through Flower's simulation engine, as ``fedprompt simulate`` runs it.

    Raises:
        PointFailed: The config does not compose, the data is missing, or the run stopped.
        KeyboardInterrupt: The run was interrupted (Ctrl-C); the grid stops with it.
    """
    from fedprompt.federation.local_simulation import check_before_flower, simulate
    from fedprompt.user_errors import USER_ERRORS

    try:
        cfg = compose_config(experiment, overrides)
        check_before_flower(cfg)  # a missing dataset fails here, before Flower starts
    except USER_ERRORS as err:
        raise PointFailed(str(err)) from None
    log = folder / FLOWER_LOG
    with _process_output_to(log):
        code = simulate(experiment, overrides, cfg)
    if code == INTERRUPTED:  # simulate stops Flower on Ctrl-C and returns 130: stop the grid too
        raise KeyboardInterrupt
    if code != 0 or read_summary(folder) is None:
        reason = failure_reason(folder) or _logged_error(log) or f"flwr run exited with code {code}"
        raise PointFailed(f"{reason.rstrip('.')} (Flower's log: {log}).")


class SessionProgress(threading.Thread):
    """Tells the grid, point by point, when each point of a session has written its summary.

    The session runs in this process's main thread (so Ctrl-C stops it); this thread watches
    the points' folders in plan order and records when each one ends.

    Args:
        folders: The session's points' folders, in the order the session runs them.
        report: Called with each folder and its seconds as the point ends.
        interval: Seconds between looks.
    """

    def __init__(
        self,
        folders: Sequence[Path],
        report: Callable[[Path, float], None],
        interval: float = 0.2,
    ) -> None:
        super().__init__(daemon=True)
        self.folders, self.report, self.interval = list(folders), report, interval
        self.seconds: dict[Path, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        """Wait for each folder's summary in turn; report it as it appears."""
        last = time.perf_counter()
        for folder in self.folders:
            while _summary_file_status(folder) is None:
                if self._done.wait(self.interval):
                    return
            now = time.perf_counter()
            self.seconds[folder] = now - last
            self.report(folder, now - last)
            last = now

    def finish(self) -> None:
        """Stop watching (the session ended); the caller settles the points not reported yet."""
        self._done.set()
        self.join()


def _summary_file_status(folder: Path) -> str | None:
    try:
        summary = _summary_file(folder)
    except (OSError, ValueError):  # being written: look again
        return None
    return None if summary is None else str(summary.get("status", "completed"))


def _write_refusal(folder: Path, reason: str) -> None:
    """A failed ``summary.json`` for a point refused before it ran (repeating the grid retries)."""
    record = {"status": "failed", "reason": reason, "rounds_completed": 0, "final": None}
    (folder / "summary.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def run_session(
    experiment: str,
    points: Sequence[Point],
    folders: Sequence[Path],
    out: Path,
    report: Callable[[Path, float], None],
) -> None:
    """Run the points in one Flower simulation (``grid_session``); the actors stay warm.

    Each point is checked first as ``run_point`` does: one that fails (a missing dataset) is
    recorded as failed in its folder before Flower starts. The rest run one after another
    through the same ServerApp and ClientApp as single runs, each writing its own folder,
    Flower's whole output going to ``out/flower.log``. ``report`` hears of each point as it
    ends, with its seconds.

    Raises:
        KeyboardInterrupt: The session was interrupted (Ctrl-C); the grid stops with it.
    """
    from fedprompt.federation.grid_session import GridPlan
    from fedprompt.federation.local_simulation import check_before_flower, simulate_plan
    from fedprompt.user_errors import USER_ERRORS

    planned: list[tuple[str, ...]] = []
    watched: list[Path] = []
    for point, folder in zip(points, folders, strict=True):
        overrides = (*point.overrides, f"output_dir={folder.resolve()}")
        try:
            check_before_flower(compose_config(experiment, list(overrides)))
        except USER_ERRORS as err:
            _write_refusal(folder, str(err))
            report(folder, 0.0)
            continue
        planned.append(overrides)
        watched.append(folder)
    if not planned:
        return
    progress = SessionProgress(watched, report)
    progress.start()
    try:
        code = simulate_plan(
            GridPlan(experiment, tuple(planned)), out / SESSION_PLAN, out / FLOWER_LOG
        )
    finally:
        progress.finish()
    if code == INTERRUPTED:
        raise KeyboardInterrupt


def run_grid(
    experiment: str,
    points: Sequence[Point],
    out: Path,
    runner: PointRunner | None = None,
    result: Callable[[Mapping[str, Any]], str] | None = None,
    check: SummaryCheck | None = None,
) -> list[Outcome]:
    """Run every point not yet finished under ``out``, one after another; a failure is noted.

    Args:
        experiment: The experiment every point starts from.
        points: The grid, in the order to run it.
        out: The study folder (see ``open_study``).
        runner: Runs one point in a simulation of its own (``run_point``, or a fake in tests);
            None (the default) runs all the points in one simulation whose actors stay warm
            (``run_session``). Callers check the points first (``check_points``).
        result: Words for a finished point's progress line (default: its accuracy).
        check: Says what is wrong with a finished point's summary for this grid (a setting
            the run did not apply, a metric it did not report), or None where it is usable.

    Raises:
        GridError: An empty grid, a point named twice, or a folder holding another run.
    """
    if not points:
        raise GridError("The grid is empty; give at least one value for every axis.")
    names = [point.name for point in points]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise GridError(f"The grid holds point {twice[0]} twice; list each value once.")
    result = result or _accuracy_words
    folders = [out / point.name for point in points]
    for point, folder in zip(points, folders, strict=True):
        _check_point_folder(point, folder)
    done = sum(read_summary(folder) is not None for folder in folders)
    total = len(points)
    if done == total:
        print(f"fedprompt: all {total} points already have results in {out}; not running them.")
    elif done:
        print(
            f"fedprompt: resuming: {done} of {total} points already have results in {out}; "
            f"running the other {total - done}."
        )
    if runner is None:
        outcomes = _run_in_session(experiment, points, folders, out, result, check)
        _report_failures(outcomes)
        return outcomes
    outcomes = []
    for index, (point, folder) in enumerate(zip(points, folders, strict=True), start=1):
        print(f"[{index}/{total}] {point.description} ...", end=" ", flush=True)
        reused = read_summary(folder) is not None
        try:
            outcome = (
                Outcome(point, folder, read_summary(folder), None, 0.0, reused=True)
                if reused
                else _run_one(experiment, point, folder, runner)
            )
        except KeyboardInterrupt:
            print("interrupted", flush=True)  # closes the progress line
            raise
        outcome = _checked(outcome, check)
        print(_progress_words(outcome, result), flush=True)
        outcomes.append(outcome)
    _report_failures(outcomes)
    return outcomes


def _checked(outcome: Outcome, check: SummaryCheck | None) -> Outcome:
    """The outcome, failed where its summary does not fit the grid (``check``)."""
    problem = check(outcome.point, outcome.summary) if check and outcome.summary else None
    return replace(outcome, summary=None, error=problem) if problem else outcome


def _progress_words(outcome: Outcome, result: Callable[[Mapping[str, Any]], str]) -> str:
    when = "done before" if outcome.reused else f"{outcome.seconds:.0f} s"
    if outcome.summary is not None:
        return f"{when}, {result(outcome.summary)}"
    return f"failed ({when}): {outcome.error}"


def _run_in_session(
    experiment: str,
    points: Sequence[Point],
    folders: Sequence[Path],
    out: Path,
    result: Callable[[Mapping[str, Any]], str],
    check: SummaryCheck | None,
) -> list[Outcome]:
    """``run_grid`` with every pending point in one simulation (``run_session``).

    A progress line is printed as each point ends, in the grid's order.
    """
    total = len(points)
    line = {folder: index for index, folder in enumerate(folders, start=1)}
    outcomes: dict[Path, Outcome] = {}

    def settle(folder: Path, seconds: float) -> None:
        if folder in outcomes:
            return
        point = points[line[folder] - 1]
        summary = read_summary(folder)
        error = None
        if summary is None:
            error = failure_reason(folder) or (
                f"the session ended before this point finished (Flower's log: {out / FLOWER_LOG})."
            )
        outcome = _checked(Outcome(point, folder, summary, error, seconds, reused=False), check)
        outcomes[folder] = outcome
        print(
            f"[{line[folder]}/{total}] {point.description} ... {_progress_words(outcome, result)}",
            flush=True,
        )

    pending = []
    for point, folder in zip(points, folders, strict=True):
        summary = read_summary(folder)
        if summary is not None:
            outcome = _checked(Outcome(point, folder, summary, None, 0.0, reused=True), check)
            outcomes[folder] = outcome
            print(
                f"[{line[folder]}/{total}] {point.description} ... "
                f"{_progress_words(outcome, result)}",
                flush=True,
            )
            continue
        folder.mkdir(parents=True, exist_ok=True)
        record = {"overrides": list(point.overrides), "labels": point.labels}
        (folder / POINT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # An earlier failure's record: the point runs again and writes its own.
        (folder / "summary.json").unlink(missing_ok=True)
        pending.append((point, folder))
    if pending:
        try:
            run_session(
                experiment, [p for p, _ in pending], [f for _, f in pending], out, settle
            )
        except KeyboardInterrupt:
            print("fedprompt: interrupted; finished points keep their results.", flush=True)
            raise
        for _, folder in pending:
            settle(folder, 0.0)
    return [outcomes[folder] for folder in folders]


def _report_failures(outcomes: Sequence[Outcome]) -> None:
    """How many points failed, and what running them again takes."""
    failed = [outcome for outcome in outcomes if not outcome.ok]
    unusable = sum(read_summary(outcome.folder) is not None for outcome in failed)
    if len(failed) > unusable:
        print(
            f"fedprompt: {len(failed) - unusable} of {len(outcomes)} points failed (marked in "
            "the tables); repeat the command to run them again."
        )
    if unusable:
        print(
            f"fedprompt: {unusable} finished runs do not fit this grid (said above; marked as "
            "failed); delete their folders and repeat the command to run them again."
        )


def _run_one(experiment: str, point: Point, folder: Path, runner: PointRunner) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"overrides": list(point.overrides), "labels": point.labels}
    (folder / POINT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    started = time.perf_counter()
    error = None
    try:
        runner(experiment, [*point.overrides, f"output_dir={folder.resolve()}"], folder)
    except PointFailed as err:
        error = str(err)
    seconds = time.perf_counter() - started
    summary = read_summary(folder)
    if error is None and summary is None:
        error = f"the run wrote no summary.json in {folder}."
    return Outcome(point, folder, summary if error is None else None, error, seconds, reused=False)


def _check_point_folder(point: Point, folder: Path) -> None:
    """A finished run in the point's folder must be this point's, or the tables would lie."""
    record = folder / POINT_FILE
    if not (folder / "summary.json").is_file():
        return
    held = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    if held.get("overrides") != list(point.overrides):
        raise GridError(
            f"{folder} holds a run of other settings than this point's "
            f"({' '.join(point.overrides)}); move it away or give a new --out."
        )


def _accuracy_words(summary: Mapping[str, Any]) -> str:
    accuracy = (summary.get("final") or {}).get("accuracy")
    return "accuracy n/a" if accuracy is None else f"accuracy {100 * accuracy:.1f}%"


# ---------------------------------------------------------------- statistics


def mean_and_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) over seeds; None where undefined."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None
