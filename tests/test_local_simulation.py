"""Stopping a private SuperLink stops every process it started, Ray's daemons included."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fedprompt.federation.local_simulation import _group_alive, _stop, _terminate_as_interrupt

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A parent that starts a grandchild in a session of its own (as the SuperLink starts the
# SuperExec, whose group holds Ray), prints its pid, and waits.
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_ends_the_group_and_the_groups_it_started():
    parent = subprocess.Popen(
        [sys.executable, "-c", SPAWNER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    grandchild = int(parent.stdout.readline())
    assert _group_alive(grandchild)
    _stop(parent)
    deadline = time.monotonic() + 10
    while _group_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert parent.poll() is not None
    assert not _group_alive(grandchild)


def test_sigterm_becomes_an_interrupt_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before
