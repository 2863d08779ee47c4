"""What a person sees of a run: fedprompt's own lines on the terminal, Flower's whole log in a file.

Two pieces. ``print_unprinted_records`` gives every fedprompt process (the CLI, the ServerApp, each
ClientApp) one console handler for the log records no other handler prints, so that each line is
printed once. ``FlowerOutput`` splits what ``flwr run --stream`` prints: all of it goes to
``flower.log`` in the results folder, and the terminal gets a few lines per run (one per round,
progress of long steps, warnings and errors of fedprompt, Flower's errors).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

FLOWER_LOG = "flower.log"
"""Flower's whole output of a run, in the run's results folder."""

INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C or SIGTERM (128 + SIGINT)."""


class _UnprintedRecords(logging.Filter):
    """Passes a record that no other handler printed and that does not repeat the one before.

    Flower prints its records with a handler on the ``flwr`` logger, huggingface_hub with one on
    ``huggingface_hub``; both propagate to the root, so a root handler would print them again.
    A warning that two steps of one command log alike (the data layer's, when the CLI reads the
    data twice before Flower starts) is worth one line.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[str, int, str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        root = logging.getLogger()
        while logger is not None and logger is not root:
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
                return False
            logger = logger.parent if logger.propagate else None
        key = (record.name, record.levelno, record.getMessage())
        if key == self._last:
            return False
        self._last = key
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time, as Flower redirects and mirrors it."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.WARNING)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


def print_unprinted_records() -> None:
    """Give the root logger a console handler for warnings nobody else prints, if it has none.

    Without it, the first library that calls ``logging.basicConfig`` (Opacus does on import) or
    ``logging.warning`` (open_clip) installs one that prints everything reaching the root: each
    Flower line appeared twice, once in Flower's format and once in Opacus's, DEBUG lines too.
    A program that configured logging before importing fedprompt keeps its own configuration.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = _StderrHandler()
    handler.addFilter(_UnprintedRecords())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray forwards an actor's output as "(ClientAppActor pid=123) ..." and folds repeats into one.
_RAY_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\)\s*")
_RAY_REPEATS = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")
_FLOWER_LINE = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(?P<msg>.*)$")
_LIBRARY_ERROR = re.compile(r"^(?:ERROR|CRITICAL) [\w.]+: ")
_TQDM = re.compile(r"^(?P<desc>[^|]+?):\s+(?P<pct>\d+)%\|.*\|\s*(?P<n>\d+)/(?P<total>\d+)\s+\[")
_ROUND = re.compile(r"^\[ROUND (?P<round>\d+)/(?P<rounds>\d+)\]$")


class FlowerOutput:
    """Everything ``flwr run --stream`` prints to a log; to a terminal, the lines a person reads.

    By default the terminal shows the ServerApp's ``[fedprompt]`` lines (``round r/N | ...``,
    its warnings and errors), every error, the progress of long steps that report it (the
    server's feature extraction), and, when nothing has been shown for ``heartbeat_s``, which
    round is running and for how long (each site encodes its images in its first round, out of
    sight in its Ray actor). Library warnings stay in the log: the CLI has printed those about
    the data already, before Flower started. ``verbose`` shows everything as it comes.

    Args:
        log: Receives every character, as it comes.
        terminal: Where a person reads.
        verbose: Show everything instead of choosing.
        heartbeat_s: Seconds without a shown line after which a "still running" line is shown.
        progress_s: On a terminal that is not interactive, seconds between two lines of the same
            progress bar (an interactive one redraws a single status line instead).
        clock: Seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        log: TextIO,
        terminal: TextIO,
        *,
        verbose: bool = False,
        heartbeat_s: float = 20.0,
        progress_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.terminal = terminal
        self.verbose = verbose
        self.heartbeat_s = heartbeat_s
        self.progress_s = progress_s
        self.clock = clock
        self.interactive = bool(getattr(terminal, "isatty", lambda: False)())
        self._pending = ""
        self._status = False
        self._serving = False  # the ServerApp has said something
        self._round: tuple[int, int] | None = None
        self._first_round: int | None = None
        self._since = clock()
        self._last_shown = self._since
        self._bars: dict[str, float] = {}
        self._bar = ""

    def feed(self, text: str) -> None:
        """Take the next piece of Flower's output (any length, lines may be split)."""
        if not text:
            return
        self.log.write(text)
        self.log.flush()
        if self.verbose:
            self.terminal.write(text)
            self.terminal.flush()
            return
        self._pending += text
        # tqdm redraws with "\r": each state of a progress bar is a segment of its own, and the
        # newest is shown before the next one ends it.
        *segments, self._pending = re.split(r"\r\n|\n|\r", self._pending)
        for segment in segments:
            self._take(segment)
        bar = _TQDM.match(self._clean(self._pending))
        if bar:
            self._take_bar(bar)

    def tick(self) -> None:
        """Call now and then: shows which round is running when nothing was shown for a while."""
        now = self.clock()
        if self.verbose or now - self._last_shown < self.heartbeat_s:
            return
        seconds = now - self._since
        if self._round is None and not self._serving:
            self._show(f"fedprompt: Flower's simulation engine is starting ({seconds:.0f} s)")
            return
        if self._round is None:
            self._show(
                f"[fedprompt] preparing the first round for {seconds:.0f} s (the server loads the "
                "data and the backbone and encodes its test images, unless they are cached)"
            )
            return
        done, total = self._round
        why = ""
        if done == self._first_round:
            why = (
                " (in its first round each site loads the backbone in its Ray actor and encodes "
                "its images, unless they are cached)"
            )
        self._show(f"[fedprompt] round {done}/{total} running for {seconds:.0f} s{why}")

    def close(self) -> None:
        """Handle a last unfinished line and clear a progress status line."""
        if self._pending:
            self._take(self._pending)
            self._pending = ""
        self._clear_status()

    @staticmethod
    def _clean(segment: str) -> str:
        text = _ANSI.sub("", segment)
        return _RAY_REPEATS.sub("", _RAY_PREFIX.sub("", text)).strip()

    def _take(self, segment: str) -> None:
        text = self._clean(segment)
        if not text:
            return
        bar = _TQDM.match(text)
        if bar:
            self._take_bar(bar)
            return
        line = _FLOWER_LINE.match(text)
        if line is None:
            if _LIBRARY_ERROR.match(text):  # from print_unprinted_records' handler
                self._show(text)
            return
        level, message = line["level"], line["msg"].strip()
        started = _ROUND.match(message)
        if started:
            self._round = int(started["round"]), int(started["rounds"])
            self._first_round = self._first_round or self._round[0]
            self._since = self.clock()
        if "[fedprompt]" in message:
            self._serving = True
            self._show(message if level == "INFO" else f"{level}: {message}")
        elif level in ("ERROR", "CRITICAL"):
            self._show(f"{level}: {message}")

    def _take_bar(self, bar: re.Match[str]) -> None:
        desc, n, total = bar["desc"].strip(), int(bar["n"]), int(bar["total"])
        text = f"{desc}: {bar['pct']}% ({n}/{total})"
        if text == self._bar:  # the state shown while it was the newest, now ended by the next
            return
        self._bar = text
        now = self.clock()
        if self.interactive:
            self.terminal.write(f"\r\x1b[K{text}")
            self.terminal.flush()
            self._status = True
            self._last_shown = now
            if n >= total:
                self._clear_status()
            return
        started = self._bars.setdefault(desc, now)
        if n >= total:
            del self._bars[desc]
            self._show(text)
        elif now - started >= self.progress_s:
            self._bars[desc] = now
            self._show(text)

    def _show(self, line: str) -> None:
        self._clear_status()
        self.terminal.write(line + "\n")
        self.terminal.flush()
        self._last_shown = self.clock()

    def _clear_status(self) -> None:
        if self._status:
            self.terminal.write("\r\x1b[K")
            self.terminal.flush()
            self._status = False
