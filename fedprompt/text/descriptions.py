"""Class descriptions: several hand-written sentences per class, bundled per dataset or user-given.

Methods such as BiomedCoOp (Koleilat et al., CVPR 2025) anchor the learned prompt to an ensemble of
sentences describing each class. fedprompt bundles its own sentences, written by the team, one
JSON file per dataset under ``fedprompt/text/descriptions/``::

    {"dataset": "btmri", "datasets": ["btmri"], "modality": "brain MRI",
     "classes": {"glioma tumor": ["A brain MRI showing ...", ...], ...}}

A user may bring a file in that layout or in BiomedCoOp's plain one, ``{"class name": ["sentence",
...], ...}`` (``method.descriptions=/path/to/file.json``). Class names match case-insensitively,
with underscores read as spaces; every class of the run must have at least one sentence.

``method.descriptions=authors`` takes the papers' own 50 LLM sentences per class instead, once
``fedprompt data descriptions <dataset>`` has put them in fedprompt's cache
(``author_descriptions.py``); the bundled sentences stay the offline default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DESCRIPTIONS_DIR = Path(__file__).parent / "descriptions"
AUTHORS = "authors"
"""The ``method.descriptions`` value that selects the authors' downloaded descriptions."""
_HINT = "give a file with method.descriptions=/path/to/descriptions.json"


class DescriptionsError(ValueError):
    """Descriptions cannot be found, read, or do not cover every class; the message says why."""


def normalise_classname(name: str) -> str:
    """The form class names are matched in: lower case, underscores as spaces, single spaces."""
    return " ".join(name.replace("_", " ").lower().split())


@dataclass(frozen=True)
class ClassDescriptions(Mapping[str, tuple[str, ...]]):
    """The sentences of each class of a run, in label order.

    Attributes:
        source: Where they came from (a bundled set's name or a file path).
        sentences: Class name (as the run spells it) -> its sentences.
    """

    source: str
    sentences: Mapping[str, tuple[str, ...]]

    def __getitem__(self, classname: str) -> tuple[str, ...]:
        return self.sentences[classname]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sentences)

    def __len__(self) -> int:
        return len(self.sentences)


def read_description_file(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """Class name -> sentences from a fedprompt or BiomedCoOp-style JSON file.

    Raises:
        DescriptionsError: The file is missing, not JSON, or not a mapping of class names to
            lists of strings.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DescriptionsError(f"description file {path} does not exist; {_HINT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DescriptionsError(f"description file {path} is not readable JSON: {err}") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if isinstance(classes, dict):
        data = classes
    if not isinstance(data, dict) or not data:
        raise DescriptionsError(
            f"description file {path} must map class names to lists of sentences, "
            'as in {"class name": ["sentence", ...]} (or hold such a mapping under "classes")'
        )
    sentences: dict[str, tuple[str, ...]] = {}
    for name, items in data.items():
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise DescriptionsError(
                f"description file {path}: class {name!r} must have a list of sentences (strings)"
            )
        sentences[name] = tuple(s.strip() for s in items if s.strip())
    return sentences


def _manifest(path: Path) -> tuple[str, ...]:
    """Dataset names a bundled file declares (its ``datasets`` list, else its file name)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    names = data.get("datasets") or [data.get("dataset") or path.stem]
    return tuple(str(name) for name in names)


@cache
def _bundled() -> dict[str, Path]:
    """Dataset name -> bundled file, for every file and every dataset it declares."""
    sets: dict[str, Path] = {}
    for path in sorted(DESCRIPTIONS_DIR.glob("*.json")):
        for name in (path.stem, *_manifest(path)):
            sets[name] = path
    return sets


def bundled_description_sets() -> list[str]:
    """Dataset names with bundled descriptions (usable as ``method.descriptions=<name>``)."""
    return sorted(_bundled())


def find_bundled_set(classnames: Sequence[str]) -> str | None:
    """The bundled set whose classes cover ``classnames``, preferring an exact match.

    Returns:
        Its name, or None when no bundled file covers every class.

    Raises:
        DescriptionsError: Several bundled files cover the classes and none matches them exactly.
    """
    wanted = {normalise_classname(name) for name in classnames}
    exact, covering = set(), set()
    for path in set(_bundled().values()):
        have = {normalise_classname(name) for name in read_description_file(path)}
        if have == wanted:
            exact.add(path)
        elif wanted <= have:
            covering.add(path)
    found = exact or covering
    if not found:
        return None
    if len(found) > 1:
        names = sorted(path.stem for path in found)
        raise DescriptionsError(
            f"the classes {sorted(wanted)} appear in several bundled description sets "
            f"{names}; choose one with method.descriptions=<name> or {_HINT}"
        )
    return next(iter(found)).stem


def _covering_file(files: Sequence[Path], classnames: Sequence[str]) -> Path | None:
    """The file whose classes cover ``classnames``, preferring one that matches them exactly."""
    wanted = {normalise_classname(name) for name in classnames}
    covering = None
    for path in files:
        have = {normalise_classname(name) for name in read_description_file(path)}
        if have == wanted:
            return path
        if wanted <= have and covering is None:
            covering = path
    return covering


def author_descriptions_file(classnames: Sequence[str]) -> Path:
    """The downloaded authors' file that covers ``classnames`` (``method.descriptions=authors``).

    Raises:
        DescriptionsError: None is downloaded; the message names the command that fetches it.
    """
    from fedprompt.text.author_descriptions import author_cache_dir, author_datasets

    found = _covering_file(sorted(author_cache_dir().glob("*.json")), classnames)
    if found is not None:
        return found
    from fedprompt.data.registry import DATASETS

    wanted = {normalise_classname(name) for name in classnames}
    names = [
        name
        for name in author_datasets()
        if {normalise_classname(c) for c in DATASETS[name].classnames or ()} == wanted
    ]
    command = f"fedprompt data descriptions {names[0] if names else '<dataset>'}"
    raise DescriptionsError(
        f"method.descriptions=authors needs the authors' descriptions of the classes "
        f"{list(classnames)}, which are not downloaded in {author_cache_dir()}; run `{command}` "
        f"(datasets: {', '.join(author_datasets())}) where a connection is available."
    )


def load_descriptions(
    classnames: Sequence[str], source: str | os.PathLike | None = None
) -> ClassDescriptions:
    """The sentences of every class in ``classnames``, checked for coverage.

    Args:
        classnames: The run's class names, in label order.
        source: A bundled set's name (``btmri``), ``"authors"`` (the papers' descriptions,
            downloaded beforehand), a JSON file path, or None to pick the bundled set whose
            classes cover ``classnames``.

    Raises:
        DescriptionsError: No source covers the classes, or some class has no sentence; the
            message names those classes and how to supply them.
    """
    if source is None:
        found = find_bundled_set(classnames)
        if found is None:
            raise DescriptionsError(
                f"no bundled class descriptions cover the classes {list(classnames)} (bundled: "
                f"{bundled_description_sets()}); {_HINT}"
            )
        source = found
    bundled = _bundled()
    if str(source) == AUTHORS:
        path = author_descriptions_file(classnames)
    elif str(source) in bundled:
        path = bundled[str(source)]
    else:
        path = Path(source).expanduser()
    label = str(source)
    by_key: dict[str, tuple[str, ...]] = {}
    for name, items in read_description_file(path).items():
        by_key.setdefault(normalise_classname(name), ())
        by_key[normalise_classname(name)] += items
    missing = [name for name in classnames if not by_key.get(normalise_classname(name))]
    if missing:
        raise DescriptionsError(
            f"the descriptions in {path} have no sentence for the classes {missing}; add "
            f'sentences under those names (e.g. "{missing[0]}": ["...", ...]) or {_HINT}'
        )
    return ClassDescriptions(
        source=label,
        sentences={name: by_key[normalise_classname(name)] for name in classnames},
    )
