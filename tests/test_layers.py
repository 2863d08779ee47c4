"""The library never imports Flower: only fedprompt.federation (and the CLI that drives it) may."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "fedprompt"
LIBRARY = ["backbones", "learners", "text", "data", "privacy", "evaluation"]
LIBRARY_FILES = sorted(
    path for layer in LIBRARY for path in (PACKAGE / layer).rglob("*.py") if path.exists()
) + [PACKAGE / name for name in ("config.py", "results.py", "training.py", "site_rounds.py")]


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_does_not_import_flower(path):
    flower = {m for m in _imported_modules(path) if m == "flwr" or m.startswith("flwr.")}
    federation = {m for m in _imported_modules(path) if m.startswith("fedprompt.federation")}
    assert not flower and not federation, f"{path.name} imports {flower | federation}"
