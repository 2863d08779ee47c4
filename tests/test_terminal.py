"""The terminal of a run: Flower's output split into a log and a few lines; each log line once."""

import io
import subprocess
import sys

from fedprompt.terminal import FlowerOutput

INFO = "\x1b[92mINFO \x1b[0m:      "
WARNING = "\x1b[93mWARNING \x1b[0m:   "
ERROR = "\x1b[91mERROR \x1b[0m:     "
ACTOR = "\x1b[36m(ClientAppActor pid=4242)\x1b[0m "

# What `flwr run --stream` printed of a quickstart round (ANSI colours, tqdm's "\r" redraws, a
# Ray actor's forwarded line), shortened.
STREAM = (
    "Using SuperLink: fedprompt (127.0.0.1:40053)\n"
    f"{INFO}Starting Flower Simulation\n"
    f"{WARNING}Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n"
    f"{INFO}[fedprompt] results folder: /runs/q\n"
    "WARNING root: No pretrained weights loaded for model 'local-dir:/c/m'.\n"
    "\rglobal test features:   0%|          | 0/2 [00:00<?, ?it/s]"
    "\rglobal test features:  50%|█████     | 1/2 [00:00<00:00,  1.82it/s]"
    "\rglobal test features: 100%|██████████| 2/2 [00:00<00:00,  3.30it/s]"
    "\r                                                                   \r"
    f"{INFO}Starting UpdateValidation strategy:\n"
    f"{INFO}\t├── Number of rounds: 2\n"
    f"{INFO}[fedprompt] before training: central accuracy 30.0%\n"
    f"{INFO}[ROUND 1/2]\n"
    f"{INFO}configure_train: Sampled 3 nodes (out of 3)\n"
    "/venv/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray\n"
    "  warnings.warn(\n"
    f"{ACTOR}WARNING fedprompt.data.feature_cache: Feature cache /c/f cannot be written\n"
    f"{ACTOR}ERROR fedprompt.data.sites: Image /d/x.png cannot be read\n"
    f"{INFO}aggregate_train: Received 3 results and 0 failures\n"
    f"{INFO}[fedprompt] round 1/2 | train loss 1.3836 (3 sites) | 9.1 s\n"
    f"{WARNING}[fedprompt] round 1: site-2 is missing: no reply\n"
    f"{ERROR}Simulation raised an exception\n"
    "Traceback (most recent call last):\n"
    '  File "x.py", line 1, in <module>\n'
)

SHOWN = [
    "[fedprompt] results folder: /runs/q",
    "global test features: 100% (2/2)",
    "[fedprompt] before training: central accuracy 30.0%",
    "ERROR fedprompt.data.sites: Image /d/x.png cannot be read",
    "[fedprompt] round 1/2 | train loss 1.3836 (3 sites) | 9.1 s",
    "WARNING: [fedprompt] round 1: site-2 is missing: no reply",
    "ERROR: Simulation raised an exception",
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_the_terminal_gets_fedprompts_lines_and_the_log_gets_everything():
    for size in (len(STREAM), 7, 1):  # lines arrive cut anywhere
        log, terminal = io.StringIO(), io.StringIO()
        output = FlowerOutput(log, terminal)
        for piece in _split(STREAM, size):
            output.feed(piece)
        output.close()
        assert terminal.getvalue().splitlines() == SHOWN
        assert log.getvalue() == STREAM


def test_verbose_shows_everything_as_it_comes():
    log, terminal = io.StringIO(), io.StringIO()
    output = FlowerOutput(log, terminal, verbose=True)
    for piece in _split(STREAM, 50):
        output.feed(piece)
        output.tick()
    output.close()
    assert terminal.getvalue() == log.getvalue() == STREAM


def test_a_long_silence_says_which_round_runs_and_for_how_long():
    clock, terminal = Clock(), io.StringIO()
    output = FlowerOutput(io.StringIO(), terminal, heartbeat_s=30, clock=clock)
    clock.now = 29
    output.tick()
    assert terminal.getvalue() == ""
    clock.now = 31
    output.tick()
    assert terminal.getvalue() == "fedprompt: Flower's simulation engine is starting (31 s)\n"
    output.feed(f"{INFO}[fedprompt] results folder: /runs/q\n")
    clock.now = 62
    output.tick()
    assert terminal.getvalue().splitlines()[-1] == (
        "[fedprompt] preparing the first round for 62 s (the server loads the data and the "
        "backbone and encodes its test images, unless they are cached)"
    )
    output.feed(f"{INFO}[ROUND 1/5]\n")
    clock.now = 92
    output.tick()
    assert terminal.getvalue().splitlines()[-1] == (
        "[fedprompt] round 1/5 running for 30 s (in its first round each site loads the backbone "
        "in its Ray actor and encodes its images, unless they are cached)"
    )
    output.feed(f"{INFO}[fedprompt] round 1/5 | train loss 1.2\n{INFO}[ROUND 2/5]\n")
    clock.now = 126
    output.tick()
    assert terminal.getvalue().splitlines()[-1] == "[fedprompt] round 2/5 running for 34 s"


def test_a_slow_progress_bar_prints_now_and_then_without_a_terminal():
    clock, terminal = Clock(), io.StringIO()
    output = FlowerOutput(io.StringIO(), terminal, progress_s=10, clock=clock)
    for step, now in enumerate((0, 4, 11, 15, 22)):
        clock.now = now
        output.feed(f"\rtest features:  {20 * step}%|##   | {step}/5 [00:01<00:04]")
    clock.now = 23
    output.feed("\rtest features: 100%|#####| 5/5 [00:23<00:00]\r     \r")
    assert terminal.getvalue().splitlines() == [
        "test features: 40% (2/5)",
        "test features: 80% (4/5)",
        "test features: 100% (5/5)",
    ]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_an_interactive_terminal_redraws_one_status_line():
    terminal = Tty()
    output = FlowerOutput(io.StringIO(), terminal)
    output.feed("\rtest features:  50%|##   | 1/2 [00:01<00:01]")
    assert terminal.getvalue() == "\r\x1b[Ktest features: 50% (1/2)"
    output.feed(f"\n{INFO}[fedprompt] before training: central accuracy 30.0%\n")
    assert terminal.getvalue().endswith(
        "\r\x1b[K[fedprompt] before training: central accuracy 30.0%\n"
    )


# Opacus calls logging.basicConfig() on import; Flower, huggingface_hub and fedprompt's library
# modules all log. Each record must reach stderr once, and a repeated warning too.
ONE_LINE_EACH = """
import logging
import fedprompt
import opacus
from flwr.common.logger import log
log(logging.INFO, "flower line")
log(logging.DEBUG, "flower debug line")
logging.getLogger("huggingface_hub.utils._http").warning("hub line")
logging.getLogger("fedprompt.data.feature_cache").warning("library line")
logging.getLogger("fedprompt.data.feature_cache").warning("library line")
logging.getLogger("fedprompt.data.feature_cache").info("library detail")
"""


def test_each_log_record_is_printed_once_in_a_fedprompt_process():
    done = subprocess.run(
        [sys.executable, "-c", ONE_LINE_EACH], capture_output=True, text=True, check=True
    )
    lines = (done.stdout + done.stderr).splitlines()
    assert sum("flower line" in line for line in lines) == 1, lines
    assert not any("debug" in line for line in lines), lines
    assert sum("hub line" in line for line in lines) == 1, lines
    assert "WARNING fedprompt.data.feature_cache: library line" in lines
    assert not any("library detail" in line for line in lines), lines
