"""The BiomedCoOp authors' class descriptions: where they are published, fetched and checked.

BiomedCoOp (Koleilat et al., CVPR 2025) and the papers that follow it use 50 LLM-written
sentences per class. Their authors publish them not as JSON but as one Python dictionary,
``BIOMEDCOOP_TEMPLATES`` in ``trainers/prompt_templates.py`` of the GitHub repository
HealthX-Lab/BiomedCoOp, shared by every dataset (72 classes). ``fedprompt data descriptions
<dataset>`` downloads that file at a pinned commit, checks its SHA-256, reads the dictionary
without running the file (``ast.literal_eval``), keeps the dataset's classes and writes them in
the layout ``descriptions.py`` reads, under ``<cache>/descriptions/biomedcoop/<dataset>.json``.
Runs then take them with ``method.descriptions=authors``; nothing is downloaded during a run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedprompt.backbones import default_cache_dir
from fedprompt.network import offline_requested, unreachable
from fedprompt.text.descriptions import DescriptionsError, normalise_classname

BIOMEDCOOP_COMMIT = "7ceb5a89ce4c2ff110b11605f858ab2ca0c8573e"
"""The commit of HealthX-Lab/BiomedCoOp whose file the checksum below was taken from."""

BIOMEDCOOP_URL = (
    f"https://raw.githubusercontent.com/HealthX-Lab/BiomedCoOp/{BIOMEDCOOP_COMMIT}/"
    "trainers/prompt_templates.py"
)
BIOMEDCOOP_SHA256 = "a3713d8a77cd839c9208be486cc9386257eb5614d2460023426696bcb3881dc6"
BIOMEDCOOP_VARIABLE = "BIOMEDCOOP_TEMPLATES"
FETCH_TIMEOUT_S = 60.0


class AuthorDescriptionsError(DescriptionsError):
    """The authors' descriptions cannot be fetched, verified or converted; the message says why."""


@dataclass(frozen=True)
class AuthorSource:
    """Where one dataset's descriptions are published.

    Attributes:
        url: Raw URL of the published file, pinned to a commit.
        sha256: Its hex SHA-256, computed from that commit.
        variable: The module-level dictionary in the file that maps class names to sentences.
        aliases: fedprompt's class name -> the authors' key, where they differ.
    """

    url: str = BIOMEDCOOP_URL
    sha256: str = BIOMEDCOOP_SHA256
    variable: str = BIOMEDCOOP_VARIABLE
    aliases: Mapping[str, str] = field(default_factory=dict)


AUTHOR_SOURCES: dict[str, AuthorSource] = {
    name: AuthorSource()
    for name in (
        "btmri",
        "busi",
        "chmnist",
        "covid_19",
        "ctkidney",
        "dermamnist",
        "kneexray",
        "kvasir",
        "lungcolon",
        "retina",
    )
}
AUTHOR_SOURCES["octmnist"] = AuthorSource(aliases={"normal": "normal OCT scan"})


def author_datasets() -> list[str]:
    """Datasets whose authors' descriptions ``fedprompt data descriptions`` can fetch."""
    return sorted(AUTHOR_SOURCES)


def author_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted files live: ``<cache>/descriptions/biomedcoop/`` (``$FEDPROMPT_CACHE``)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / "descriptions" / "biomedcoop"


def fetch_bytes(url: str) -> bytes:
    """The body of ``url`` (urllib's errors are ``OSError``s)."""
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
        return bytes(response.read())


def read_published_dictionary(source: bytes, variable: str) -> dict[str, list[str]]:
    """The literal dictionary assigned to ``variable`` in a Python file, without running it.

    Raises:
        AuthorDescriptionsError: The file has no such literal mapping of names to sentence lists.
    """
    try:
        tree = ast.parse(source.decode("utf-8"))
    except (UnicodeDecodeError, SyntaxError) as err:
        raise AuthorDescriptionsError(f"the published file is not readable Python: {err}") from None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == variable
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                break
            if isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v)
                for k, v in value.items()
            ):
                return value
            break
    raise AuthorDescriptionsError(
        f"the published file has no literal {variable} mapping class names to lists of sentences"
    )


def convert(
    published: Mapping[str, Sequence[str]],
    dataset: str,
    classnames: Sequence[str],
    source: AuthorSource,
) -> dict[str, object]:
    """The dataset's classes from the authors' dictionary, in ``descriptions.py``'s layout.

    Raises:
        AuthorDescriptionsError: Some class of the dataset has no entry in the dictionary.
    """
    by_key = {normalise_classname(key): list(items) for key, items in published.items()}
    classes: dict[str, list[str]] = {}
    missing = []
    for name in classnames:
        items = by_key.get(normalise_classname(source.aliases.get(name, name)))
        if items:
            classes[name] = items
        else:
            missing.append(name)
    if missing:
        raise AuthorDescriptionsError(
            f"the authors' descriptions at {source.url} have no sentences for the {dataset} "
            f"classes {missing}"
        )
    return {
        "dataset": dataset,
        "datasets": [dataset],
        "source": source.url,
        "sha256": source.sha256,
        "classes": classes,
    }


def download_author_descriptions(
    dataset: str,
    classnames: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    fetch: Callable[[str], bytes] | None = None,
) -> Path:
    """Fetch, verify and convert the authors' descriptions of ``dataset``; return the file.

    A download whose SHA-256 differs from the recorded one is refused and nothing is written;
    the converted file appears in one step (temporary file, then rename).

    Args:
        dataset: A name of ``author_datasets()``.
        classnames: The dataset's class names, in label order.
        cache_dir: fedprompt's cache root; default ``$FEDPROMPT_CACHE`` or ``~/.cache/fedprompt``.
        fetch: Returns a URL's bytes; default ``fetch_bytes`` (tests replace it).

    Raises:
        AuthorDescriptionsError: Unknown dataset, offline, failed download, checksum mismatch
            or a class without sentences; the message says what to do.
    """
    source = AUTHOR_SOURCES.get(dataset)
    if source is None:
        raise AuthorDescriptionsError(
            f"the authors publish no descriptions for {dataset!r} that fedprompt knows of; "
            f"choose one of {author_datasets()} or give a file with "
            "method.descriptions=/path/to/descriptions.json"
        )
    offline = "HF_HUB_OFFLINE asks for no network"
    reason = offline if offline_requested() else unreachable(source.url)
    if reason:
        raise AuthorDescriptionsError(
            f"Downloading the authors' descriptions from {source.url} is not possible: "
            f"{reason}; connect and run `fedprompt data descriptions {dataset}` again, or keep "
            "the bundled descriptions (method.descriptions=null)."
        )
    try:
        payload = (fetch or fetch_bytes)(source.url)
    except OSError as err:
        raise AuthorDescriptionsError(
            f"Downloading the authors' descriptions from {source.url} failed ({err}); check the "
            f"connection and run `fedprompt data descriptions {dataset}` again."
        ) from err
    actual = hashlib.sha256(payload).hexdigest()
    if actual != source.sha256:
        raise AuthorDescriptionsError(
            f"The file downloaded from {source.url} has SHA-256 {actual}, not the recorded "
            f"{source.sha256}, so it was refused and nothing was kept."
        )
    converted = convert(
        read_published_dictionary(payload, source.variable), dataset, classnames, source
    )
    target = author_cache_dir(cache_dir) / f"{dataset}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(converted, out, indent=1, ensure_ascii=False)
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target
