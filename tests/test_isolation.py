"""The session's isolated state (conftest.py): every home and cache lies in its temporary folder."""

import os
import subprocess
import sys
from pathlib import Path

import conftest

from fedprompt.backbones import default_cache_dir


def _session_root() -> Path:
    assert conftest._session_root is not None
    return conftest._session_root


def _inside(path) -> bool:
    return Path(path).resolve().is_relative_to(_session_root().resolve())


def test_home_and_every_cache_variable_point_into_the_session_folder():
    for name in conftest.ISOLATED_ENV:
        assert _inside(os.environ[name]), name
    for name in conftest.REMOVED_ENV:
        assert name not in os.environ, name
    assert _inside(Path.home()) and _inside(Path("~/.cache").expanduser())


def test_fedprompt_flower_and_the_libraries_write_inside_the_session_folder():
    import huggingface_hub.constants
    import matplotlib
    import medmnist.info
    from flwr.supercore.utils import get_flwr_home

    places = {
        "fedprompt cache": default_cache_dir(),
        "Flower home": get_flwr_home(),
        "matplotlib cache": matplotlib.get_cachedir(),
        "matplotlib config": matplotlib.get_configdir(),
        "Hugging Face hub": huggingface_hub.constants.HF_HUB_CACHE,
        "medmnist root": medmnist.info.DEFAULT_ROOT,
    }
    outside = {name: str(path) for name, path in places.items() if not _inside(path)}
    assert not outside


def test_the_backbone_builds_go_to_the_session_cache_unless_kept(backbone_cache_dir):
    if os.environ.get("FEDPROMPT_TEST_CACHE"):
        assert not _inside(backbone_cache_dir)
    else:
        assert backbone_cache_dir == default_cache_dir()


def test_a_process_a_test_starts_inherits_the_isolation():
    script = (
        "import os, pathlib; from flwr.supercore.utils import get_flwr_home; "
        "print(pathlib.Path.home()); print(get_flwr_home()); print(os.environ['FEDPROMPT_CACHE'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(_inside(line) for line in lines)
