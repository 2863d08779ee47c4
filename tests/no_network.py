"""A machine without network, for tests: every connection fails at once, and none is attempted."""

import errno
import socket

import pytest


def cut_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Make name lookups and connections fail as on an offline machine; returns the attempts."""
    attempts: list[tuple] = []

    def unreachable(*args, **kwargs):
        attempts.append(args)
        raise OSError(errno.ENETUNREACH, "Network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    return attempts
