"""Servers that tests start on ports the servers bind themselves, retried when a port was taken.

flower-superlink, flower-supernode and nginx bind the port their command line names and cannot
report one the kernel chose (port 0): the SuperLink and SuperNode hand their own address to the
processes they start, and nginx has no way to tell. A test therefore names ports the kernel just
handed out, and another process may take one before the server binds it. ``start_on_free_ports``
starts again on fresh ports when the server's own output says so ("address already in use"), a
bounded number of times.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from contextlib import ExitStack
from typing import TypeVar

TRIES = 5
# uvicorn (Flower's servers): "[Errno 98] ... address already in use"; nginx: "(98: Address
# already in use)"; server/start-superlink.sh: "... is already in use (address already in use)".
ADDRESS_IN_USE = re.compile(r"address already in use", re.IGNORECASE)

Started = TypeVar("Started")


class PortTaken(Exception):
    """A server could not bind a port it was given: another process held it."""


def fresh_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (and may not be now).

    All are bound at once, so they differ; all are closed on return, so a server can bind them.
    """
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def raise_if_taken(output: str) -> None:
    """Raise ``PortTaken`` where a server's output says a port it was given was in use."""
    found = ADDRESS_IN_USE.search(output)
    if found:
        line = output[: found.end()].rsplit("\n", 1)[-1] + output[found.end() :].split("\n", 1)[0]
        raise PortTaken(line.strip())


def start_on_free_ports(
    start: Callable[[list[int]], Started],
    count: int = 1,
    tries: int = TRIES,
    choose: Callable[[int], list[int]] = fresh_ports,
) -> Started:
    """``start(ports)`` on ``count`` fresh ports, started again on others while it raises PortTaken.

    Args:
        start: Starts the server on the ports; raises ``PortTaken`` (``raise_if_taken`` on its
            output) when one was taken, having stopped whatever it started.
        count: Ports each start needs.
        tries: Starts before giving up.
        choose: Where the ports come from (a test occupies the first ones it hands out).

    Raises:
        RuntimeError: Every one of the ``tries`` starts found a port taken.
    """
    taken: list[str] = []
    for _ in range(tries):
        try:
            return start(choose(count))
        except PortTaken as error:
            taken.append(str(error))
    raise RuntimeError(f"no start in {tries} tries; each found a port taken: {taken}")


class FirstPortTaken:
    """A ``choose`` for ``start_on_free_ports`` whose first port another socket already holds.

    The socket listens on ``port`` until the ``with`` block ends; the first start gets ``port``
    (and fresh ports for the rest), every later start fresh ports. ``tried``: each start's ports.
    """

    def __init__(self) -> None:
        self._holder = socket.socket()
        self._holder.bind(("127.0.0.1", 0))
        self._holder.listen()
        self.port = int(self._holder.getsockname()[1])
        self.tried: list[list[int]] = []

    def __call__(self, count: int) -> list[int]:
        ports = fresh_ports(count) if self.tried else [self.port, *fresh_ports(count - 1)]
        self.tried.append(ports)
        return ports

    def __enter__(self) -> FirstPortTaken:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._holder.close()
