"""Reader for the BiomedCoOp layout: ``<root>/<DIR>/split_<DIR>.json`` + ``<root>/<DIR>/<DIR>/``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprompt.data.image_set import (
    DataError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageSet,
    config_classnames,
    resolve_root,
)

HF_REPO_ID = "TahaKoleilat/BiomedCoOp"
SPLIT_URL = (
    "https://raw.githubusercontent.com/HealthX-Lab/BiomedCoOp/main/data/{dir}/split_{dir}.json"
)
SPLIT_NAMES = ("train", "val", "test")

SplitEntries = dict[str, list[tuple[str, int, str]]]


@dataclass(frozen=True)
class BiomedCoOpPaths:
    """Where BiomedCoOp's code expects a dataset's files, given the folder that holds it."""

    root: Path
    dir_name: str

    @property
    def dataset_dir(self) -> Path:
        """``<root>/<DIR>``: holds the split file and the image folder."""
        return self.root / self.dir_name

    @property
    def image_dir(self) -> Path:
        """``<root>/<DIR>/<DIR>``: split paths are relative to this folder."""
        return self.dataset_dir / self.dir_name

    @property
    def split_file(self) -> Path:
        """``<root>/<DIR>/split_<DIR>.json``."""
        return self.dataset_dir / f"split_{self.dir_name}.json"


def manual_steps(dir_name: str, root: Path) -> str:
    """How to place a BiomedCoOp dataset by hand, for error messages and docs."""
    paths = BiomedCoOpPaths(root, dir_name)
    return (
        f"download {dir_name}.zip from the Hugging Face dataset repository {HF_REPO_ID} "
        f"(https://huggingface.co/datasets/{HF_REPO_ID}), unpack it into {paths.dataset_dir}/ so "
        f"that the class folders lie in {paths.image_dir}/, and save "
        f"{SPLIT_URL.format(dir=dir_name)} as {paths.split_file}"
    )


def read_split_file(path: Path) -> SplitEntries:
    """Parse a BiomedCoOp split json into ``{split: [(rel_path, label, classname), ...]}``.

    Raises:
        DataError: If the file is not valid JSON or not in the BiomedCoOp format.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"Split file {path} cannot be read as JSON ({err}); download it again."
        ) from err
    if not isinstance(raw, dict) or "train" not in raw or "test" not in raw:
        raise DataError(
            f"Split file {path} must be a JSON object with 'train', 'val' and 'test' lists of "
            "[rel_path, label, classname]; replace it with the BiomedCoOp split file."
        )
    out: SplitEntries = {}
    for split in SPLIT_NAMES:
        rows = raw.get(split) or []
        parsed = []
        for row in rows:
            if not (isinstance(row, list | tuple) and len(row) == 3):
                raise DataError(
                    f"Split file {path} has the entry {row!r} in '{split}', expected "
                    "[rel_path, label, classname]; replace it with the BiomedCoOp split file."
                )
            rel, label, classname = row
            parsed.append((str(rel).replace("\\", "/"), int(label), str(classname)))
        out[split] = parsed
    return out


def split_classnames(entries: SplitEntries, path: Path) -> list[str]:
    """Class names ordered by label id, checked to be one name per id with no gaps.

    Raises:
        DataError: If a label id carries two names or the ids are not 0..C-1.
    """
    names: dict[int, str] = {}
    for rows in entries.values():
        for _, label, classname in rows:
            if names.setdefault(label, classname) != classname:
                raise DataError(
                    f"Split file {path} gives label {label} two class names, "
                    f"{names[label]!r} and {classname!r}; fix the split file."
                )
    if sorted(names) != list(range(len(names))):
        raise DataError(
            f"Split file {path} uses label ids {sorted(names)}, expected 0..{len(names) - 1}; "
            "fix the split file."
        )
    return [names[i] for i in range(len(names))]


def read_biomedcoop(
    root: str | Path,
    dir_name: str,
    *,
    name: str | None = None,
    classnames: Sequence[str] | None = None,
    how_to_get: str | None = None,
) -> DatasetSplits:
    """Read a dataset in the BiomedCoOp layout under ``root``.

    Args:
        root: Folder holding ``<DIR>/`` (BiomedCoOp's ``DATASET.ROOT``).
        dir_name: The dataset's folder name, e.g. ``"BTMRI"``.
        name: Name for the returned splits; defaults to ``dir_name.lower()``.
        classnames: Expected class names in label order; checked against the split file.
        how_to_get: Sentence appended to not-found errors saying how to obtain the data.

    Raises:
        DatasetNotFoundError: If the split file, the image folder or a listed image is missing.
        DataError: If the split file is malformed or its classes differ from ``classnames``.
    """
    paths = BiomedCoOpPaths(Path(root), dir_name)
    hint = f" {how_to_get}" if how_to_get else ""
    if not paths.split_file.is_file() or not paths.image_dir.is_dir():
        misplaced = ""
        if (paths.root / paths.split_file.name).is_file():
            misplaced = (
                f" (there is a {paths.split_file.name} directly in {paths.root}: set the root "
                f"to its parent folder {paths.root.parent})"
            )
        raise DatasetNotFoundError(
            f"Dataset {dir_name} was not found: expected the split file {paths.split_file} and "
            f"the images under {paths.image_dir}/<class_dir>/{misplaced}.{hint}"
        )
    entries = read_split_file(paths.split_file)
    found = split_classnames(entries, paths.split_file)
    if classnames is not None and list(classnames) != found:
        raise DataError(
            f"Split file {paths.split_file} lists the classes {found} but the config lists "
            f"{list(classnames)}; make the config's `classnames` match the split file's "
            "(in label order) or use the split file that belongs to this config."
        )
    splits: dict[str, ImageSet | None] = {}
    for split in SPLIT_NAMES:
        rows = entries[split]
        if not rows:
            splits[split] = None
            continue
        first = paths.image_dir / rows[0][0]
        if not first.is_file():
            raise DatasetNotFoundError(
                f"Image {first}, listed in {paths.split_file}, is missing; the images must lie "
                f"under {paths.image_dir}/ with the relative paths the split file gives.{hint}"
            )
        splits[split] = ImageSet(
            items=[paths.image_dir / rel for rel, _, _ in rows],
            labels=[label for _, label, _ in rows],
            classnames=found,
            identities=[f"{dir_name}/{rel}" for rel, _, _ in rows],
        )
    train, test = splits["train"], splits["test"]
    if train is None or test is None:
        raise DataError(
            f"Split file {paths.split_file} has an empty 'train' or 'test' list; replace it "
            "with a complete split file."
        )
    return DatasetSplits(
        name=name or dir_name.lower(),
        classnames=found,
        train=train,
        val=splits["val"],
        test=test,
    )


def load_biomedcoop(cfg: Mapping[str, Any]) -> DatasetSplits:
    """Read a ``format: biomedcoop`` config, downloading first when it says ``download: true``.

    Raises:
        DatasetNotFoundError: If the files are missing (the message names the expected paths
            and how to get them).
    """
    dir_name = str(cfg["dir"])
    name = str(cfg.get("name") or dir_name.lower())
    root = resolve_root(cfg.get("root"))
    paths = BiomedCoOpPaths(root, dir_name)
    complete = paths.split_file.is_file() and paths.image_dir.is_dir()
    if not complete and cfg.get("download", False):
        from fedprompt.data.download import download_dataset

        download_dataset(cfg, root)
    how_to_get = (
        f"Get it with `fedprompt data download {name} --root {root}` (or set `download: true` "
        f"in the dataset config), or by hand: {manual_steps(dir_name, root)}."
    )
    return read_biomedcoop(
        root,
        dir_name,
        name=name,
        classnames=config_classnames(cfg),
        how_to_get=how_to_get,
    )
