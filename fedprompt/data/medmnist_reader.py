"""Reader for MedMNIST+ 2D datasets, through the ``medmnist`` package, offline when possible."""

from __future__ import annotations

from collections.abc import Mapping
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

SIZES = (28, 64, 128, 224)
SPLIT_NAMES = ("train", "val", "test")


def npz_name(flag: str, size: int) -> str:
    """File name the medmnist package uses: ``breastmnist.npz``, ``breastmnist_224.npz``."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_info(flag: str) -> dict[str, Any]:
    """The medmnist package's INFO entry for a 2D single-label flag.

    Raises:
        DataError: For an unknown flag, a 3D flag or a multi-label task.
    """
    import medmnist

    info = medmnist.INFO.get(flag)
    if info is None:
        known = sorted(k for k in medmnist.INFO if not k.endswith("3d"))
        raise DataError(f"Unknown MedMNIST flag {flag!r}; use one of {known}.")
    if flag.endswith("3d"):
        raise DataError(f"MedMNIST flag {flag!r} is a 3D volume set; only 2D flags are supported.")
    if info["task"].startswith("multi-label"):
        raise DataError(
            f"MedMNIST flag {flag!r} is multi-label ({info['task']}); only single-label "
            "classification sets are supported."
        )
    return info


def medmnist_classnames(flag: str) -> list[str]:
    """Class names from medmnist's INFO labels, ordered by label id."""
    labels = medmnist_info(flag)["label"]
    return [labels[str(i)] for i in range(len(labels))]


def _size(cfg: Mapping[str, Any]) -> int:
    size = int(cfg.get("size") or 28)
    if size not in SIZES:
        raise DataError(f"MedMNIST `size` must be one of {SIZES}, got {size}.")
    return size


def download_medmnist(flag: str, size: int, root: Path) -> Path:
    """Fetch ``<root>/<npz>`` through the medmnist package, which checks its md5.

    Raises:
        DatasetNotFoundError: If the download fails; the message gives the manual steps.
    """
    import medmnist

    info = medmnist_info(flag)
    root.mkdir(parents=True, exist_ok=True)
    suffix = "" if size == 28 else f"_{size}"
    cls = getattr(medmnist, info["python_class"])
    try:
        cls(split="train", root=str(root), size=size, download=True)
    except Exception as err:
        raise DatasetNotFoundError(
            f"Downloading {npz_name(flag, size)} failed ({type(err).__name__}); download "
            f"{info[f'url{suffix}']} by hand (md5 {info[f'MD5{suffix}']}) and save it as "
            f"{root / npz_name(flag, size)}."
        ) from err
    return root / npz_name(flag, size)


def load_medmnist(cfg: Mapping[str, Any]) -> DatasetSplits:
    """Read a ``format: medmnist`` config (keys ``flag``, ``size``, ``root``, ``download``).

    Gray images stay single-channel in memory and become RGB when an item is read.

    Raises:
        DatasetNotFoundError: If the npz file is missing and ``download`` is false.
        DataError: If the config's ``classnames`` differ from medmnist's labels.
    """
    import medmnist

    flag = str(cfg["flag"]).lower()
    size = _size(cfg)
    info = medmnist_info(flag)
    name = str(cfg.get("name") or flag)
    root = resolve_root(cfg.get("root"))
    path = root / npz_name(flag, size)
    if not path.is_file():
        if not cfg.get("download", False):
            raise DatasetNotFoundError(
                f"MedMNIST file {path} was not found; set `download: true` in the dataset "
                f"config or run `fedprompt data download {name} --root {root}` (or save "
                f"{info['url' if size == 28 else f'url_{size}']} there by hand)."
            )
        download_medmnist(flag, size, root)
    classnames = medmnist_classnames(flag)
    expected = config_classnames(cfg)
    if expected is not None and expected != classnames:
        raise DataError(
            f"MedMNIST {flag} has the classes {classnames} but the config lists {expected}; "
            "make the config's `classnames` match medmnist's labels (in label order)."
        )
    cls = getattr(medmnist, info["python_class"])
    prefix = flag if size == 28 else f"{flag}_{size}"
    splits: dict[str, ImageSet] = {}
    for split in SPLIT_NAMES:
        try:
            data = cls(split=split, root=str(root), size=size, download=False)
        except Exception as err:
            raise DataError(
                f"MedMNIST file {path} cannot be read ({err}); delete it and download it again."
            ) from err
        images = np.asarray(data.imgs, dtype=np.uint8)
        labels = np.asarray(data.labels).reshape(len(images), -1)[:, 0]
        splits[split] = ImageSet(
            items=images,
            labels=labels,
            classnames=classnames,
            identities=[f"{prefix}/{split}/{i}" for i in range(len(images))],
        )
    return DatasetSplits(
        name=name,
        classnames=classnames,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
    )
