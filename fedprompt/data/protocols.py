"""Evaluation protocols: which classes the sites train on and which the prompt is tested on.

``few_shot`` (the default): every class is trained and tested; ``train.shots`` images per class at
each site (0: all of them), as in CoOp's and BiomedCoOp's few-shot tables (K = 1, 2, 4, 8, 16).

``base_to_novel`` (CoCoOp's generalisation protocol, used by BiomedCoOp, OGKD and vMFCoOp): the
sites train on the base classes only, the first ceil(C/2) label ids; the prompt is then tested
on the base classes' test images and, separately, on the novel classes' (never seen in
training, each with its own class list); the harmonic mean of the two accuracies is the
headline number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedprompt.config import ConfigError
from fedprompt.data.image_set import DatasetSplits, ImageSet

PROTOCOLS = ("few_shot", "base_to_novel")


def protocol_name(protocol_cfg: Mapping[str, Any] | None) -> str:
    """The protocol's name, checked (``few_shot`` where a config has no protocol section)."""
    name = "few_shot" if protocol_cfg is None else str(protocol_cfg["name"])
    if name not in PROTOCOLS:
        raise ConfigError(f"Unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}.")
    return name


def base_class_count(num_classes: int) -> int:
    """Base classes: the first ceil(C/2) label ids; the rest are novel.

    Raises:
        ConfigError: Fewer than two classes, so there is no novel class.
    """
    if num_classes < 2:
        raise ConfigError(
            f"protocol=base_to_novel needs at least two classes; the dataset has {num_classes}."
        )
    return math.ceil(num_classes / 2)


def class_subset(images: ImageSet, class_ids: Sequence[int]) -> ImageSet:
    """The images of ``class_ids``, relabelled 0.. in that order, with those class names.

    The images keep their identities, so cached features are shared with the full set.
    """
    ids = [int(c) for c in class_ids]
    relabel = np.full(len(images.classnames), -1, dtype=np.int64)
    relabel[ids] = np.arange(len(ids))
    out = images.subset(np.flatnonzero(np.isin(images.labels, ids)))
    out.labels = relabel[out.labels]
    out.classnames = [images.classnames[c] for c in ids]
    return out


def split_classes(splits: DatasetSplits, class_ids: Sequence[int]) -> DatasetSplits:
    """Every split restricted to ``class_ids`` (relabelled, see ``class_subset``)."""
    return DatasetSplits(
        name=splits.name,
        classnames=[splits.classnames[int(c)] for c in class_ids],
        train=class_subset(splits.train, class_ids),
        val=None if splits.val is None else class_subset(splits.val, class_ids),
        test=class_subset(splits.test, class_ids),
    )


def base_ids(num_classes: int) -> list[int]:
    """Label ids of the base classes."""
    return list(range(base_class_count(num_classes)))


def novel_ids(num_classes: int) -> list[int]:
    """Label ids of the novel classes."""
    return list(range(base_class_count(num_classes), num_classes))


def training_splits(protocol_cfg: Mapping[str, Any] | None, splits: DatasetSplits) -> DatasetSplits:
    """The splits the sites see: all classes, or only the base classes under base-to-novel."""
    if protocol_name(protocol_cfg) != "base_to_novel":
        return splits
    return split_classes(splits, base_ids(splits.num_classes))


def novel_splits(splits: DatasetSplits) -> DatasetSplits:
    """The novel classes' splits (relabelled 0..), for testing a prompt trained on the base."""
    return split_classes(splits, novel_ids(splits.num_classes))


def protocol_report(
    protocol_cfg: Mapping[str, Any] | None, shots: int, classnames: Sequence[str] = ()
) -> dict[str, Any]:
    """``summary.json``'s ``protocol`` entry: name, shots, and the base and novel classes.

    Args:
        protocol_cfg: The run's ``protocol`` section.
        shots: ``train.shots``.
        classnames: The dataset's full class list (base-to-novel lists its two halves).
    """
    name = protocol_name(protocol_cfg)
    report: dict[str, Any] = {"name": name, "shots": int(shots)}
    if name == "base_to_novel" and classnames:
        report["base_classes"] = [classnames[c] for c in base_ids(len(classnames))]
        report["novel_classes"] = [classnames[c] for c in novel_ids(len(classnames))]
    return report
