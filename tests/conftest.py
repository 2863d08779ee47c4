"""Shared set-up: an isolated home and caches for the session; the two miniature backbones.

Isolated state (tests/README.md, "Isolated state and random order"): before any test module is
imported, ``pytest_configure`` points ``HOME``, the XDG folders and every cache the suite or its
libraries write to (``FEDPROMPT_CACHE``, ``FLWR_HOME``, matplotlib's, Hugging Face's) at folders
of one temporary directory of the session, removed at its end (a killed session's, by the next).
Processes the tests start inherit ``os.environ``, so they are isolated the same way. Nothing is
read from or written to the user's home or caches. ``FEDPROMPT_TEST_CACHE`` (opt-in) keeps the
backbone builds across sessions: they are built there and linked into the session's
``FEDPROMPT_CACHE``; nothing else is kept.

This module imports no fedprompt code at its top: Hugging Face reads its folders when imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fedprompt.backbones import Backbone

# Variables pointed into the session's folder (relative to it); the XDG ones and HOME cover
# libraries that write under the home without a variable of their own (medmnist's ~/.medmnist).
ISOLATED_ENV = {
    "HOME": "home",
    "XDG_CACHE_HOME": "home/.cache",
    "XDG_CONFIG_HOME": "home/.config",
    "XDG_DATA_HOME": "home/.local/share",
    "XDG_STATE_HOME": "home/.local/state",
    "FEDPROMPT_CACHE": "fedprompt-cache",
    "FLWR_HOME": "flwr-home",
    "MPLCONFIGDIR": "matplotlib",
    "HF_HOME": "huggingface",
}
# Variables that would point a library's cache elsewhere than the folders above.
REMOVED_ENV = ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME")
SESSION_PREFIX = "fedprompt-tests-"  # then the pytest process's id
_saved_env: dict[str, str | None] = {}
_session_root: Path | None = None


def _remove_folders_of_ended_sessions() -> None:
    """The folders of sessions that were killed before their end (their process is gone)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SESSION_PREFIX}*-*"):
        pid = folder.name[len(SESSION_PREFIX) :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # another user's process: alive


def _backbone_builds() -> list[str]:
    """The folder names ``load_backbone`` builds into its cache root."""
    from fedprompt.backbones.loader import BUILD_FORMAT

    kinds = ("miniature", "miniature-native", "biomedclip-random")
    return [f"{kind}-v{BUILD_FORMAT}" for kind in kinds]


def _kept_builds_dir() -> Path | None:
    configured = _saved_env.get("FEDPROMPT_TEST_CACHE") or os.environ.get("FEDPROMPT_TEST_CACHE")
    return Path(configured).expanduser().absolute() if configured else None


def pytest_configure(config: pytest.Config) -> None:
    """Points the home and every cache at the session's temporary folder (module docstring)."""
    global _session_root
    _remove_folders_of_ended_sessions()
    _session_root = Path(tempfile.mkdtemp(prefix=f"{SESSION_PREFIX}{os.getpid()}-"))
    for name in (*ISOLATED_ENV, *REMOVED_ENV, "FEDPROMPT_TEST_CACHE"):
        _saved_env[name] = os.environ.get(name)
    for name, relative in ISOLATED_ENV.items():
        folder = _session_root / relative
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    for name in REMOVED_ENV:
        os.environ.pop(name, None)
    _link_kept_builds()


def _link_kept_builds() -> None:
    """Links the builds ``FEDPROMPT_TEST_CACHE`` holds into the session's ``FEDPROMPT_CACHE``."""
    kept = _kept_builds_dir()
    if kept is None or _session_root is None:
        return
    for name in _backbone_builds():
        link = _session_root / ISOLATED_ENV["FEDPROMPT_CACHE"] / name
        if (kept / name).is_dir() and not link.exists():
            link.symlink_to(kept / name)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Gives the environment back and removes the session's folder."""
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _session_root is not None:
        shutil.rmtree(_session_root, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str:
    return f"isolated home and caches: {_session_root}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Repeats pytest-randomly's seed at the end, where a failing run's reader looks."""
    seed = getattr(config.option, "randomly_seed", None)  # None without pytest-randomly
    if seed is not None and getattr(config.option, "randomly_reorganize", False):
        terminalreporter.write_line(
            f"Tests ran in random order; this order again: python -m pytest -p randomly "
            f"--randomly-seed={seed} (with the same selection of tests)"
        )


@pytest.fixture(scope="session")
def backbone_cache_dir() -> Path:
    """Where the session fixtures build backbones: the session's ``FEDPROMPT_CACHE``.

    The session's, not ``os.environ``'s: a test may point that variable elsewhere when it first
    asks for a backbone. ``FEDPROMPT_TEST_CACHE`` keeps builds across sessions (module docstring).
    """
    assert _session_root is not None
    return _kept_builds_dir() or _session_root / ISOLATED_ENV["FEDPROMPT_CACHE"]


@pytest.fixture(scope="session")
def miniature_backbone(backbone_cache_dir: Path) -> Backbone:
    """Tiny BiomedCLIP-family model (timm ViT + BERT), loaded through ``local-dir:``."""
    from fedprompt.backbones import load_backbone

    backbone = load_backbone("miniature", cache_dir=backbone_cache_dir)
    _link_kept_builds()
    return backbone


@pytest.fixture(scope="session")
def miniature_native_backbone(backbone_cache_dir: Path) -> Backbone:
    """Tiny open_clip native CLIP (causal text transformer, BPE tokenizer)."""
    from fedprompt.backbones import load_backbone

    backbone = load_backbone("miniature-native", cache_dir=backbone_cache_dir)
    _link_kept_builds()
    return backbone


@pytest.fixture(scope="session", autouse=True)
def _caches_filled_before_flower_runs(request: pytest.FixtureRequest) -> None:
    """A session with an ``e2e`` test builds the miniatures and matplotlib's font list first.

    The processes Flower starts then find them in the session's caches whichever test comes first;
    otherwise the first of them would build them, taking its time (a round's heartbeat lines) and
    printing open_clip's or matplotlib's notices into the output some tests count.
    """
    if any(item.get_closest_marker("e2e") for item in request.session.items):
        import matplotlib.font_manager  # noqa: F401  (its first import writes the font list)

        request.getfixturevalue("miniature_backbone")
        request.getfixturevalue("miniature_native_backbone")


@pytest.fixture
def renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path]]:
    """Every ``os.replace(src, dst)`` the test makes, recorded and then carried out."""
    made: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def replace(src, dst):
        made.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return made
