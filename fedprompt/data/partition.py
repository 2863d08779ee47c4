"""Split a dataset across simulated sites: IID, Dirichlet label skew, pathological classes."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.data.image_set import DataError

SCHEMES = ("iid", "dirichlet", "pathological")
DIRICHLET_MAX_TRIES = 1000


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _check_sites(labels: np.ndarray, num_sites: int, seed: int) -> None:
    if seed < 0:
        raise DataError(f"The partition seed must be >= 0, got {seed}.")
    if num_sites < 1:
        raise DataError(f"num_sites must be at least 1, got {num_sites}.")
    if num_sites > len(labels):
        raise DataError(
            f"Cannot give {num_sites} sites at least one image each from {len(labels)} "
            "images; use fewer sites or more shots."
        )


def iid_partition(
    labels: Sequence[int] | np.ndarray, num_sites: int, seed: int
) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_sites`` shards whose sizes differ by at most one.

    Raises:
        DataError: If there are fewer images than sites.
    """
    labels = _labels(labels)
    _check_sites(labels, num_sites, seed)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_sites: int,
    seed: int,
    alpha: float,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Label skew: each class is spread over the sites by proportions drawn from Dir(alpha).

    Smaller ``alpha`` gives more skewed sites. Draws are repeated (from the same seeded
    stream) until every site holds at least ``min_size`` images.

    Raises:
        DataError: If ``alpha`` is not positive, ``min_size * num_sites`` exceeds the number of
            images, or no draw satisfies ``min_size`` within the retry budget.
    """
    labels = _labels(labels)
    _check_sites(labels, num_sites, seed)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be positive, got {alpha}.")
    if min_size < 0 or min_size * num_sites > len(labels):
        raise DataError(
            f"Cannot give each of {num_sites} sites at least {min_size} images from "
            f"{len(labels)} images; lower min_size or num_sites."
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(DIRICHLET_MAX_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_sites, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for site, part in enumerate(np.split(shuffled, cuts)):
                shards[site].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(
        f"No Dirichlet(alpha={alpha}) draw gave all {num_sites} sites at least {min_size} "
        f"images in {DIRICHLET_MAX_TRIES} tries ({len(labels)} images); raise alpha, lower "
        "min_size or use fewer sites."
    )


def pathological_partition(
    labels: Sequence[int] | np.ndarray,
    num_sites: int,
    seed: int,
    classes_per_site: int,
) -> list[np.ndarray]:
    """Each site holds exactly ``classes_per_site`` classes; a class is shared by its holders.

    Classes are dealt round-robin over a seeded class order, so every class is held by at
    least one site when ``num_sites * classes_per_site >= num_classes`` and holders are
    balanced; each class's images are shuffled and split evenly among its holders. When
    there are too few slots, the images of unheld classes are left out (with a warning).

    Raises:
        DataError: If ``classes_per_site`` is outside 1..num_classes or a class has fewer
            images than the sites that hold it.
    """
    labels = _labels(labels)
    _check_sites(labels, num_sites, seed)
    classes = np.unique(labels)
    if not 1 <= classes_per_site <= len(classes):
        raise DataError(
            f"classes_per_site must lie in 1..{len(classes)} (the classes present), got "
            f"{classes_per_site}."
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for site in range(num_sites):
        for j in range(classes_per_site):
            holders[int(order[(site * classes_per_site + j) % len(classes)])].append(site)
    unheld = [c for c, sites in holders.items() if not sites]
    if unheld:
        warnings.warn(
            f"{num_sites} sites x {classes_per_site} classes cannot cover {len(classes)} "
            f"classes; the images of classes {unheld} are left out.",
            stacklevel=2,
        )
    shards: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in classes:
        sites = holders[int(c)]
        if not sites:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(sites):
            raise DataError(
                f"Class {int(c)} has {len(idx)} images but {len(sites)} sites hold it, so some "
                f"would get none of it; use fewer sites, fewer classes_per_site or more shots."
            )
        for site, part in zip(sites, np.array_split(idx, len(sites)), strict=True):
            shards[site].append(part)
    return [np.sort(np.concatenate(s)) for s in shards]


def partition_labels(
    labels: Sequence[int] | np.ndarray,
    num_sites: int,
    scheme: str,
    seed: int,
    **kwargs: Any,
) -> list[np.ndarray]:
    """Dispatch to a partitioner by name.

    ``kwargs`` are the scheme's own options (``alpha``, ``min_size`` for dirichlet;
    ``classes_per_site`` for pathological). Options set to None are ignored, so one config
    can carry every scheme's keys; any other unexpected option is an error, to catch typos.

    Raises:
        DataError: For an unknown scheme, a missing or unexpected option, or an impossible
            request.
    """
    options = {k: v for k, v in kwargs.items() if v is not None}
    allowed = {
        "iid": set(),
        "dirichlet": {"alpha", "min_size"},
        "pathological": {"classes_per_site"},
    }
    if scheme not in allowed:
        raise DataError(f"Unknown partition scheme {scheme!r}; use one of {list(SCHEMES)}.")
    unexpected = sorted(set(options) - allowed[scheme])
    if unexpected:
        raise DataError(
            f"Partition scheme {scheme!r} takes the options {sorted(allowed[scheme])}, not "
            f"{unexpected}; remove them or set them to null."
        )
    if scheme == "iid":
        return iid_partition(labels, num_sites, seed)
    if scheme == "dirichlet":
        if "alpha" not in options:
            raise DataError("The dirichlet partition scheme needs `alpha` (e.g. 0.5).")
        return dirichlet_partition(
            labels,
            num_sites,
            seed,
            alpha=float(options["alpha"]),
            min_size=int(options.get("min_size", 2)),
        )
    if "classes_per_site" not in options:
        raise DataError("The pathological partition scheme needs `classes_per_site` (e.g. 2).")
    return pathological_partition(
        labels, num_sites, seed, classes_per_site=int(options["classes_per_site"])
    )


@dataclass
class SitePartition:
    """Which train and test images each site holds (indices into the dataset's splits)."""

    site_names: list[str]
    train: list[np.ndarray]
    test: list[np.ndarray]

    @property
    def num_sites(self) -> int:
        """Number of sites."""
        return len(self.site_names)

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> SitePartition:
        """Rebuild a partition from :func:`partitions_report` output (e.g. a read-back JSON)."""
        sites = report["sites"]
        return cls(
            site_names=[s["name"] for s in sites],
            train=[np.asarray(s["train_indices"], dtype=np.int64) for s in sites],
            test=[np.asarray(s["test_indices"], dtype=np.int64) for s in sites],
        )


def _largest_remainder(targets: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative ``targets`` to integers summing to ``total`` (<= their sum)."""
    base = np.floor(targets).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        order = np.argsort(-(targets - base), kind="stable")
        base[order[:rest]] += 1
    return base


def _site_test_split(
    train_parts: list[np.ndarray],
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Give each site test images in its train shard's class proportions, disjointly.

    Site ``s`` gets ``lam * n_train[s, c]`` test images of class ``c`` (rounded per class by
    largest remainder), with one scale ``lam`` for all sites: the largest one the scarcest
    class's test images allow. Test sizes are thus proportional to train sizes, and test
    images beyond what the proportions need stay unused.
    """
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    counts = np.stack([np.bincount(train_labels[p], minlength=num_classes) for p in train_parts])
    available = np.bincount(test_labels, minlength=num_classes)
    held = counts.sum(axis=0)
    usable = (held > 0) & (available > 0)
    missing = np.flatnonzero((held > 0) & (available == 0))
    if missing.size:
        warnings.warn(
            f"Classes {missing.tolist()} have train images but no test images; sites' test sets "
            "leave them out.",
            stacklevel=3,
        )
    if not usable.any():
        return [np.zeros(0, dtype=np.int64) for _ in train_parts]
    lam = float(np.min(available[usable] / held[usable]))
    tests: list[list[np.ndarray]] = [[] for _ in train_parts]
    for c in np.flatnonzero(usable):
        targets = lam * counts[:, c]
        take = _largest_remainder(targets, min(int(np.floor(targets.sum() + 1e-9)), available[c]))
        pool = rng.permutation(np.flatnonzero(test_labels == c))
        for site, part in enumerate(np.split(pool[: take.sum()], np.cumsum(take)[:-1])):
            tests[site].append(part)
    return [np.sort(np.concatenate(t)) for t in tests]  # each holds one part per usable class


def assign_sites(
    train_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    num_sites: int,
    scheme: str,
    seed: int,
    **kwargs: Any,
) -> SitePartition:
    """Partition the train split by ``scheme`` and give each site a matching test set.

    Each site's test images come from the test split in the same class proportions as its
    train shard, so a site is evaluated on its own label distribution; test sets are
    disjoint and everything is deterministic for ``seed``. A site the partition leaves without
    test images still trains; a warning names it, since its evaluation will say "no test
    images" (an empty test split already warns through its classes).

    Raises:
        DataError: As :func:`partition_labels`.
    """
    train = _labels(train_labels)
    test = _labels(test_labels)
    parts = partition_labels(train, num_sites, scheme, seed, **kwargs)
    rng = np.random.default_rng([int(seed), 1])
    tests = _site_test_split(parts, train, test, rng)
    names = [f"site-{i}" for i in range(num_sites)]
    for name, part in zip(names, tests, strict=True):
        if not len(part) and len(test):
            warnings.warn(
                f"Site {name} gets no test images ({len(test)} test images for {num_sites} "
                f"sites under the {scheme} partition), so it will train but not be evaluated; "
                "use fewer sites, another partition or a larger test split.",
                stacklevel=2,
            )
    return SitePartition(site_names=names, train=parts, test=tests)


def _histogram(labels: np.ndarray, classnames: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classnames))
    return {name: int(counts[i]) for i, name in enumerate(classnames)}


def partitions_report(
    partition: SitePartition,
    train_labels: Sequence[int] | np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    classnames: Sequence[str],
    scheme: str,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """A JSON-able record of who holds what, for reproducibility and for deploying real sites.

    ``params`` are the partition's parameters (``num_sites``, ``seed``, ``alpha``, ...); the
    seed is also copied to the top level.
    """
    train = _labels(train_labels)
    test = _labels(test_labels)
    sites = []
    for name, tr, te in zip(partition.site_names, partition.train, partition.test, strict=True):
        sites.append(
            {
                "name": name,
                "train_size": len(tr),
                "test_size": len(te),
                "train_histogram": _histogram(train[tr], classnames),
                "test_histogram": _histogram(test[te], classnames),
                "train_indices": [int(i) for i in tr],
                "test_indices": [int(i) for i in te],
            }
        )
    plain_params = json.loads(json.dumps(dict(params), default=_json_default))
    return {
        "scheme": scheme,
        "params": plain_params,
        "seed": plain_params.get("seed"),
        "num_sites": partition.num_sites,
        "classnames": list(classnames),
        "train_total": len(train),
        "test_total": len(test),
        "train_histogram": _histogram(train, classnames),
        "test_histogram": _histogram(test, classnames),
        "sites": sites,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def write_partitions_json(path: str | Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` as JSON atomically (temporary file, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=_json_default)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_partitions_json(path: str | Path) -> dict[str, Any]:
    """Read a report written by :func:`write_partitions_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
