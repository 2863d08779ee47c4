"""Real sites: a CSV manifest (``path,label,site[,split]``) read as a dataset, split by site.

``dataset=manifest`` reads the CSV ``<dataset.root>/<dataset.manifest>``; ``partition=natural``
then gives each distinct ``site`` value (sorted, and named by it) exactly the rows that name it,
so a multi-centre collection such as FLamby's Fed-ISIC2019 federates along its true hospitals
instead of along a random or label-skewed cut of the pooled images.

Test images are per site as well: a ``split`` column (``train`` or ``test``) is taken as it is;
without one, each site holds out ``dataset.test_fraction`` of each of its classes, drawn with a
seed of its own (from ``dataset.seed`` and the site's position), so a site's test images come
from its own scanner and patients and adding a site changes no other site's split.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.data.image_folder import stratified_split
from fedprompt.data.image_set import (
    DataError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageSet,
    config_classnames,
    resolve_root,
)
from fedprompt.data.partition import SitePartition

MANIFEST_COLUMNS = ("path", "label", "site")
SPLIT_COLUMN = "split"
SPLITS = ("train", "test")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Site names become folder names (``sites/<site>/`` in the results), so they stay plain."""


@dataclass(frozen=True)
class Manifest:
    """A checked manifest, one entry per row in file order.

    Attributes:
        path: The CSV file.
        classnames: Class names in label order.
        images: Each row's image file.
        labels: Each row's label id.
        identities: Each row's image identity (``<dataset name>/<path as written>``).
        sites: Each row's site.
        test: Whether each row is a test image.
    """

    path: Path
    classnames: list[str]
    images: list[Path]
    labels: np.ndarray
    identities: list[str]
    sites: list[str]
    test: np.ndarray

    @property
    def site_names(self) -> list[str]:
        """The distinct sites, sorted: the federation's sites, in partition-id order."""
        return sorted(set(self.sites))


def manifest_path(cfg: Mapping[str, Any]) -> Path:
    """The CSV a ``format: manifest`` config names: ``manifest`` (absolute, or under ``root``)."""
    manifest = Path(str(cfg.get("manifest") or "manifest.csv")).expanduser()
    return manifest if manifest.is_absolute() else resolve_root(cfg.get("root")) / manifest


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the (line number, stripped values) of every non-blank row."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"Manifest {path} does not exist; write a CSV with the columns path,label,site "
            "(and optionally split) there, or fix dataset.root and dataset.manifest."
        )
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        rows = [
            (
                reader.line_num,
                {name: value.strip() for name, value in zip(header, values, strict=False)},
            )
            for values in reader
            if any(value.strip() for value in values)
        ]
    missing = [name for name in MANIFEST_COLUMNS if name not in header]
    if missing:
        raise DataError(
            f"Manifest {path} has no {' or '.join(missing)} column (its header: "
            f"{','.join(header) or 'empty'}); start it with the header path,label,site "
            "(optionally split)."
        )
    if not rows:
        raise DataError(f"Manifest {path} lists no images; add one row per image under its header.")
    return header, rows


def _where(path: Path, line: int, column: str) -> str:
    return f"Manifest {path}, line {line}, column {column}"


def _label_ids(
    path: Path, rows: Sequence[tuple[int, dict[str, str]]], listed: list[str] | None
) -> tuple[list[str], list[int]]:
    """Class names and each row's label id: a class name, or an index into ``classnames``."""
    if listed is None:
        for line, row in rows:
            if row["label"].isdigit():
                raise DataError(
                    f"{_where(path, line, 'label')}: {row['label']} is a class index, but "
                    "dataset.classnames lists no classes to index; list them (in label order) "
                    "or write class names in the label column."
                )
        classnames = sorted({row["label"] for _, row in rows})
    else:
        classnames = listed
    names = {name.lower(): i for i, name in enumerate(classnames)}
    names.update({name.replace(" ", "_").lower(): i for i, name in enumerate(classnames)})
    labels = []
    for line, row in rows:
        raw = row["label"]
        label = names.get(raw.lower())
        if label is None and raw.isdigit() and int(raw) < len(classnames):
            label = int(raw)
        if label is None:
            raise DataError(
                f"{_where(path, line, 'label')}: {raw!r} is neither one of the classes "
                f"{classnames} nor a class index 0..{len(classnames) - 1}; fix the row or "
                "dataset.classnames."
            )
        labels.append(label)
    return classnames, labels


def read_manifest(cfg: Mapping[str, Any]) -> Manifest:
    """Read and check a manifest: every row names an existing image, a known class and a site.

    Raises:
        DatasetNotFoundError: The CSV does not exist.
        DataError: A missing column, or the first bad row (empty value, unknown label, missing
            or repeated image file, a site name that is not plain, a split other than train or
            test), named by its line and column.
    """
    path = manifest_path(cfg)
    name = str(cfg.get("name") or path.stem)
    header, rows = _rows(path)
    for line, row in rows:
        for column in MANIFEST_COLUMNS:
            if not row.get(column):
                raise DataError(
                    f"{_where(path, line, column)} is empty; give every row a path, a label "
                    "and a site."
                )
    classnames, labels = _label_ids(path, rows, config_classnames(cfg))
    images: list[Path] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        written = row["path"]
        if written in first_line:
            raise DataError(
                f"{_where(path, line, 'path')}: {written} is already listed on line "
                f"{first_line[written]}; list each image once."
            )
        first_line[written] = line
        image = Path(written).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DataError(
                f"{_where(path, line, 'path')}: image file {image} does not exist; fix the path "
                "(relative to the manifest's folder, or absolute) or remove the row."
            )
        if not SITE_NAME.fullmatch(row["site"]):
            raise DataError(
                f"{_where(path, line, 'site')}: {row['site']!r} is not a plain site name; use "
                "letters, digits, '.', '_' and '-', starting with a letter or digit."
            )
        images.append(image)
    sites = [row["site"] for _, row in rows]
    if SPLIT_COLUMN in header:
        for line, row in rows:
            if row.get(SPLIT_COLUMN) not in SPLITS:
                raise DataError(
                    f"{_where(path, line, SPLIT_COLUMN)}: {row.get(SPLIT_COLUMN)!r} is not train "
                    "or test; give every row one of them, or drop the column to hold out "
                    "dataset.test_fraction of each site."
                )
        test = np.array([row[SPLIT_COLUMN] == "test" for _, row in rows], dtype=bool)
    else:
        test = _held_out(
            sites,
            np.asarray(labels, dtype=np.int64),
            float(cfg.get("test_fraction", 0.2)),
            int(cfg.get("seed", 0) or 0),
        )
    return Manifest(
        path=path,
        classnames=classnames,
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        identities=[f"{name}/{row['path']}" for _, row in rows],
        sites=sites,
        test=test,
    )


def _held_out(sites: Sequence[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Each site's test rows: ``fraction`` of each of its classes, with a seed of its own."""
    if not 0 <= fraction < 1:
        raise DataError(
            f"dataset.test_fraction={fraction} must lie in [0, 1) to hold out part of each "
            "site's images; fix it, or add a split column to the manifest."
        )
    test = np.zeros(len(labels), dtype=bool)
    codes = np.asarray(sites)
    for position, site in enumerate(sorted(set(sites))):
        rows = np.flatnonzero(codes == site)
        site_seed = int(np.random.SeedSequence([seed, position]).generate_state(1)[0])
        _, held = stratified_split(labels[rows], fraction, site_seed)
        test[rows[held]] = True
    return test


def load_manifest(cfg: Mapping[str, Any]) -> DatasetSplits:
    """Read a ``format: manifest`` config into train and test splits (no validation split)."""
    manifest = read_manifest(cfg)
    full = ImageSet(
        items=manifest.images,
        labels=manifest.labels,
        classnames=manifest.classnames,
        identities=manifest.identities,
    )
    return DatasetSplits(
        name=str(cfg.get("name") or manifest.path.stem),
        classnames=manifest.classnames,
        train=full.subset(np.flatnonzero(~manifest.test)),
        val=None,
        test=full.subset(np.flatnonzero(manifest.test)),
    )


def natural_partition(
    dataset_cfg: Mapping[str, Any], splits: DatasetSplits, num_sites: int
) -> SitePartition:
    """Each manifest site holds exactly its own rows of ``splits`` (train and test).

    ``splits`` may be a class subset of the manifest's (``protocol=base_to_novel``): images are
    matched by identity, and the sites are always all the manifest's sites.

    Raises:
        DataError: The dataset is not a manifest, or ``num_sites`` is not its number of sites.
    """
    if dataset_cfg.get("format") != "manifest":
        raise DataError(
            f"partition=natural takes each image's site from a manifest, but dataset="
            f"{dataset_cfg.get('name')} has format {dataset_cfg.get('format')}; use "
            "dataset=manifest (a CSV path,label,site) or another partition."
        )
    manifest = read_manifest(dataset_cfg)
    names = manifest.site_names
    if num_sites != len(names):
        raise DataError(
            f"partition=natural federates the {len(names)} sites of manifest {manifest.path} "
            f"({', '.join(names)}), but federation.num_sites={num_sites}; set "
            f"federation.num_sites={len(names)}."
        )
    position = {site: i for i, site in enumerate(names)}
    site_of = {
        identity: position[site]
        for identity, site in zip(manifest.identities, manifest.sites, strict=True)
    }

    def by_site(images: ImageSet) -> list[np.ndarray]:
        codes = np.array([site_of[identity] for identity in images.identities], dtype=np.int64)
        return [np.flatnonzero(codes == k) for k in range(len(names))]

    return SitePartition(site_names=names, train=by_site(splits.train), test=by_site(splits.test))
