"""Downloads that fail fast offline: one quick connection attempt before a library's retries.

huggingface_hub retries a request five times with growing pauses and logs each attempt, so an
offline ``fedprompt data download`` or ``backbone=biomedclip`` printed ten lines over half a
minute before the sentence that says what to do. One TCP connection to the host (or the proxy
that would carry the request), with a short timeout, tells the same in at most a few seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator

CONNECT_TIMEOUT_S = 3.0


def offline_requested() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network at all.

    Read now: huggingface_hub reads it only once, when it is first imported.
    """
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((flag or "").strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def unreachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why no connection can be opened towards ``url`` now, or None when one can.

    Where a proxy is configured for the URL's scheme (``HTTPS_PROXY``, ``NO_PROXY``), the proxy
    is what must answer.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} cannot be reached ({err.strerror or err})"


@contextlib.contextmanager
def quiet_hub_retries() -> Iterator[None]:
    """huggingface_hub keeps its retry messages to itself; the caller reports a failure once."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub (and transformers, which asks it) serve from the local cache only.

    ``HF_HUB_OFFLINE`` is read once, when huggingface_hub is imported; its module value is what
    every later request consults.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
