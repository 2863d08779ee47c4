"""Reader for plain class-per-folder image trees, pre-split or split here with a seed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.data.image_set import (
    DataError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageSet,
    config_classnames,
    resolve_root,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _match_classes(
    folder_names: Sequence[str], classnames: Sequence[str] | None, where: Path
) -> tuple[list[str], dict[str, int]]:
    """Map folder names to label ids: sorted folders, or the config's order when it lists names.

    A listed name matches a folder named exactly like it or with spaces as underscores
    (``"glioma tumor"`` -> ``glioma_tumor``), case-insensitively.
    """
    if classnames is None:
        return list(folder_names), {n: i for i, n in enumerate(folder_names)}
    keys = {n: i for i, n in enumerate(classnames)}
    keys.update({n.replace(" ", "_"): i for i, n in enumerate(classnames)})
    lowered = {k.lower(): i for k, i in keys.items()}
    mapping: dict[str, int] = {}
    for folder in folder_names:
        label = lowered.get(folder.lower())
        if label is None:
            raise DataError(
                f"Class folder {where / folder} matches none of the config's classnames "
                f"{list(classnames)}; rename the folder or fix `classnames` (folders found: "
                f"{list(folder_names)})."
            )
        mapping[folder] = label
    missing = [n for i, n in enumerate(classnames) if i not in mapping.values()]
    if missing:
        raise DataError(
            f"The config's classnames {missing} have no folder in {where} (folders found: "
            f"{list(folder_names)}); add the folders or fix `classnames`."
        )
    return list(classnames), mapping


def _read_split_dir(
    folder: Path,
    root: Path,
    name: str,
    classnames: list[str],
    mapping: dict[str, int],
    may_be_empty: bool = False,
) -> ImageSet:
    """The images under ``folder/<class>/``; none is an error unless ``may_be_empty``."""
    items: list[Path] = []
    labels: list[int] = []
    for class_dir in _class_dirs(folder):
        if class_dir.name not in mapping:
            raise DataError(
                f"Class folder {class_dir} is not one of the classes {sorted(mapping)} found "
                "in the first split; give every split the same class folders."
            )
        found = _images_in(class_dir)
        items += found
        labels += [mapping[class_dir.name]] * len(found)
    if not items and not may_be_empty:
        raise DatasetNotFoundError(
            f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) were found under "
            f"{folder}/<class>/; put the images in one folder per class."
        )
    return ImageSet(
        items=items,
        labels=labels,
        classnames=classnames,
        identities=[f"{name}/{p.relative_to(root).as_posix()}" for p in items],
    )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n_c)`` images of each class (at least one when n_c >= 2)."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_held = round(fraction * len(idx))
        if fraction > 0 and len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def load_image_folder(cfg: Mapping[str, Any]) -> DatasetSplits:
    """Read a ``format: image_folder`` config.

    Two layouts: ``<root>/train/<class>/*`` + ``<root>/test/<class>/*`` (+ optional ``val/``;
    an empty ``test/`` gives an empty test split), or ``<root>/<class>/*`` split per class with
    the seeded ``test_fraction`` (and ``val_fraction``, default 0). Class names are the sorted
    folder names unless the config lists ``classnames`` (label order).

    Raises:
        DatasetNotFoundError: If the root or its class folders are missing.
        DataError: If folders and ``classnames`` disagree or a fraction is invalid.
    """
    root = resolve_root(cfg.get("root"))
    name = str(cfg.get("name") or root.name)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Image folder {root} does not exist; create it with one sub-folder per class "
            "(or train/ and test/ folders that each hold one sub-folder per class), or fix "
            "`root` in the dataset config."
        )
    expected = config_classnames(cfg)
    if (root / "train").is_dir() and (root / "test").is_dir():
        folders = [p.name for p in _class_dirs(root / "train")]
        classnames, mapping = _match_classes(folders, expected, root / "train")
        # An empty test/ is a site that trains without being evaluated (few images, or all
        # of them needed for training); an empty train/ or val/ is a mistake.
        parts = {
            split: _read_split_dir(
                root / split, root, name, classnames, mapping, may_be_empty=split == "test"
            )
            for split in ("train", "val", "test")
            if (root / split).is_dir()
        }
        return DatasetSplits(
            name=name,
            classnames=classnames,
            train=parts["train"],
            val=parts.get("val"),
            test=parts["test"],
        )
    folders = [p.name for p in _class_dirs(root)]
    if not folders:
        raise DatasetNotFoundError(
            f"Image folder {root} has no class sub-folders; put the images in "
            f"{root}/<class>/ or in {root}/train/<class>/ and {root}/test/<class>/."
        )
    classnames, mapping = _match_classes(folders, expected, root)
    full = _read_split_dir(root, root, name, classnames, mapping)
    test_fraction = float(cfg.get("test_fraction", 0.2))
    val_fraction = float(cfg.get("val_fraction", 0.0) or 0.0)
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise DataError(
            f"`test_fraction` ({test_fraction}) must lie in (0, 1) and `val_fraction` "
            f"({val_fraction}) in [0, 1) with a sum below 1; fix the dataset config."
        )
    seed = int(cfg.get("seed", 0) or 0)
    rest, test_idx = stratified_split(full.labels, test_fraction, seed)
    val = None
    train_idx = rest
    if val_fraction > 0:
        inner_train, inner_val = stratified_split(
            full.labels[rest], val_fraction / (1 - test_fraction), seed + 1
        )
        train_idx, val = rest[inner_train], full.subset(rest[inner_val])
    return DatasetSplits(
        name=name,
        classnames=classnames,
        train=full.subset(train_idx),
        val=val,
        test=full.subset(test_idx),
    )
