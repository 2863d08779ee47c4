"""Runs a command as the root of a process tree that ends when the process that started it dies.

``fedprompt simulate`` starts its private SuperLink through this guard. The SuperLink starts the
SuperExec in a session of its own, the SuperExec starts flwr-simulation, and flwr-simulation
starts Ray's GCS, raylet, agents and workers: a signal to the CLI's process group reaches none of
them, and Flower's own ``--parent-pid`` watches link each of them only to the one above it,
never to the CLI. So when the CLI was killed (SIGKILL included) they ran on and wrote rounds.

The guard's stdin is its lifeline: a pipe whose write end only the CLI holds. However the CLI
ends, the kernel closes that end, the guard reads end-of-file, and it freezes and kills every
process below it at once, before any of them can write another line. On Linux the guard is a
child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so a process whose parent exited, or that
started a session of its own, stays below it. When the command ends by itself, the guard stops
what it left behind (SIGTERM, then SIGKILL after ``GRACE_S``) and exits with its code.

Usage: ``python -m fedprompt.federation.process_guard COMMAND [ARG ...]`` with stdin a pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

GRACE_S = 10.0
"""Seconds the command's leftovers get to end after SIGTERM before SIGKILL."""

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (from ``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie has ended; only its parent's wait is missing
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(command_pid: int) -> int | None:
    """Collect every ended child; the command's exit code once it has ended."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == command_pid:
            code = os.waitstatus_to_exitcode(status)


def _wait_until_gone(deadline: float) -> set[int]:
    left = descendants(os.getpid())
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        _reap(-1)
        left = descendants(os.getpid())
    return left


def kill_tree(command_pid: int) -> None:
    """Freeze every process below this one, then kill them all: none acts after the first.

    The command is named as well: without ``/proc`` (not Linux) it is the one process known.
    """
    frozen: set[int] = set()
    # A fork may race a pass; the next one finds the child.
    while fresh := ({command_pid} | descendants(os.getpid())) - frozen:
        _signal(fresh, signal.SIGSTOP)
        frozen |= fresh
    _signal(frozen, signal.SIGKILL)
    _signal(_wait_until_gone(time.monotonic() + GRACE_S), signal.SIGKILL)


def stop_tree() -> None:
    """Ask what is left below this process to end, and kill what has not after ``GRACE_S``."""
    _signal(descendants(os.getpid()), signal.SIGTERM)
    _signal(_wait_until_gone(time.monotonic() + GRACE_S), signal.SIGKILL)
    _wait_until_gone(time.monotonic() + 1.0)


def guard(command: Sequence[str], lifeline: int) -> int:
    """Run ``command`` until it ends or ``lifeline`` reads end-of-file; return its exit code."""
    _become_subreaper()
    # SIGTERM to this group (the CLI's orderly stop) is for the command; the guard waits for
    # it to end and then tidies up. A handler rather than SIG_IGN, which the command would
    # inherit.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    while True:
        ready, _, _ = select.select([lifeline], [], [], 0.2)
        if ready and not os.read(lifeline, 4096):
            kill_tree(process.pid)
            return 128 + signal.SIGKILL
        code = _reap(process.pid)
        if code is not None:
            process.returncode = code  # reaped here; Popen must not wait for it again
            stop_tree()
            return code


if __name__ == "__main__":
    sys.exit(guard(sys.argv[1:], sys.stdin.fileno()))
