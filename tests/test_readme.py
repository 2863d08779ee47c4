"""What the README's Install, Run and Test sections state, checked against the code and a run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedprompt.config import compose_config

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "ten": 10}


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _commands(text: str) -> list[list[str]]:
    """The commands of each ```bash block, comments and blank lines dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [
        [line.split(" #")[0].strip() for line in block.splitlines() if line.strip()]
        for block in blocks
    ]


def _recipe(target: str) -> list[str]:
    """The lines of a Makefile target's recipe."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    body = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert body, target
    return [line.strip() for line in body.group(1).splitlines()]


def test_the_quickstart_has_the_sites_and_rounds_the_readme_says():
    said = re.search(r"(\w+) sites, (\w+)\s+rounds", _section("Run"))
    cfg = compose_config("quickstart")
    assert said, "the Run section names the quickstart's sites and rounds"
    assert NUMBERS[said[1]] == cfg.federation.num_sites
    assert NUMBERS[said[2]] == cfg.federation.rounds


def test_make_runs_the_commands_the_readme_gives_by_hand():
    install = _section("Install")
    assert _commands(install)[0] == ["make quickstart", "make test"]
    by_hand = _commands(install)[1]
    assert by_hand[0] == "python3 -m venv .venv && source .venv/bin/activate"
    assert by_hand[1:] == _recipe("$(INSTALLED)")[:-1]  # the recipe ends with its stamp
    assert _recipe("$(BIN)/python") == ["python3 -m venv $(VENV)"]
    assert _commands(_section("Run"))[0][0] == _recipe("quickstart")[0]
    make, by_hand = _commands(_section("Test"))
    assert make == ["make test"]
    assert by_hand == [_recipe("$(TEST_INSTALLED)")[0], *_recipe("test")]


def _listed_results() -> set[str]:
    run = _section("Run")
    table = run.split("Every run writes one results folder", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """``fedprompt simulate quickstart`` with two rounds, as a person runs it the first time.

    A feature cache of its own, so that the images are encoded (and the progress shown).
    """
    tmp = tmp_path_factory.mktemp("readme")
    out = tmp / "results"
    command = [
        sys.executable,
        "-m",
        "fedprompt.cli",
        "simulate",
        "quickstart",
        "federation.rounds=2",
        f"features.cache_dir={tmp / 'features'}",
        f"output_dir={out}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_a_run_writes_the_files_the_readme_lists(quickstart):
    out, _ = quickstart
    written = {
        re.sub(r"^sites/[^/]+/", "sites/<site>/", path.relative_to(out).as_posix())
        for path in out.rglob("*")
        if path.is_file()
    }
    assert written == _listed_results()


@pytest.mark.slow
@pytest.mark.e2e
def test_the_terminal_shows_a_few_lines_and_flower_log_holds_the_rest(quickstart):
    out, terminal = quickstart
    lines = terminal.splitlines()
    assert len(lines) <= 12, terminal
    assert len(set(lines)) == len(lines), terminal  # no line twice
    assert lines[0] == (
        "fedprompt: quickstart on Flower's simulation engine, 3 sites, 2 rounds; "
        f"Flower's log: {out / 'flower.log'}"
    )
    assert [line.split(" |")[0] for line in lines if " | " in line] == [
        "[fedprompt] round 1/2",
        "[fedprompt] round 2/2",
    ]
    assert "global test features: 100% (2/2)" in lines  # the server's feature extraction
    assert lines[-1].startswith("fedprompt: quickstart finished in ")
    for notice in ("Since flwr", "FutureWarning", "Successfully installed", "description"):
        assert notice not in terminal  # Flower's and Ray's notices stay out of sight
    log = (out / "flower.log").read_text(encoding="utf-8")
    assert "[ROUND 2/2]" in log and "aggregate_train: Received 3 results" in log
    for round_line in (line for line in lines if " | " in line):
        assert log.count(round_line) == 1  # Flower's lines are not doubled in the log either
