"""Core data types: lazily read labelled image sets, split bundles, errors, root paths."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedprompt.data.image_decoding import describe_mode, to_rgb

if TYPE_CHECKING:
    from fedprompt.data.acquisition import AcquisitionProfile

# Pixels per in-memory image that its content fingerprint samples (a strided sample, not all).
_FINGERPRINT_SAMPLES = 64


class DataError(ValueError):
    """A data problem explained in one sentence: what is wrong and what to do about it."""


class DatasetNotFoundError(DataError):
    """A dataset (or one of its files) is not where the configuration says it is."""


class CorruptImageError(DataError):
    """An image file exists but cannot be decoded."""


class ImageSet(torch.utils.data.Dataset):
    """Labelled images, read lazily; items are file paths or in-memory uint8 arrays.

    Subsets share the underlying storage and keep an index into it, so taking few-shot
    or per-site subsets of a large in-memory array costs no copy of the pixels.

    Attributes:
        classnames: Class names ordered by label id.
        labels: Integer label of each item (int64).
        identities: Stable per-image ids (e.g. ``"BTMRI/glioma_tumor/image12.jpg"``), used with
            ``content_fingerprint`` as keys by feature caches; unique within a dataset.
        transform: Applied to the RGB ``PIL.Image`` on access, if set.
        acquisition: The simulated scanner a site sees these images through
            (``with_acquisition``), applied to the decoded image before ``transform``; None
            for the images as stored.
    """

    def __init__(
        self,
        items: Sequence[str | Path] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        classnames: Sequence[str],
        identities: Sequence[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        """Build a set from paths or a uint8 array of shape (N, H, W) or (N, H, W, C).

        Raises:
            DataError: If items, labels and identities disagree in length or a label is
                outside ``range(len(classnames))``.
        """
        if isinstance(items, np.ndarray):
            if items.dtype != np.uint8 or items.ndim not in (3, 4):
                raise DataError(
                    f"In-memory images must be a uint8 array of shape (N, H, W) or (N, H, W, C), "
                    f"got {items.dtype} with shape {items.shape}; convert them before building "
                    "an ImageSet."
                )
            self._items: list[str] | np.ndarray = items
        else:
            self._items = [str(p) for p in items]
        count = len(self._items)
        self._index = np.arange(count, dtype=np.int64)
        self.classnames = list(classnames)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if identities is None:
            identities = (
                [f"item/{i}" for i in range(count)]
                if isinstance(self._items, np.ndarray)
                else list(self._items)
            )
        self.identities = list(identities)
        self.transform = transform
        self.acquisition: AcquisitionProfile | None = None
        if not (len(self.labels) == count == len(self.identities)):
            raise DataError(
                f"An ImageSet got {count} images, {len(self.labels)} labels and "
                f"{len(self.identities)} identities; give one label and one identity per image."
            )
        if count and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise DataError(
                f"Labels must lie in 0..{len(self.classnames) - 1} for the "
                f"{len(self.classnames)} classes {self.classnames}, got labels from "
                f"{self.labels.min()} to {self.labels.max()}; fix the labels or the class list."
            )

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Image.Image, int]:
        """Decode image ``i`` as RGB, apply the transform and return it with its label.

        Raises:
            CorruptImageError: If the file cannot be decoded.
            DatasetNotFoundError: If the file listed for this item does not exist.
        """
        image = self._load(int(self._index[i]))
        if self.acquisition is not None:
            image = self.acquisition(image, self.identities[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def stored_mode(self, i: int) -> str:
        """How image ``i`` is stored and what decoding does to it (``describe_mode``).

        Reads the file's header only, so a site check can report its images' modes cheaply.

        Raises:
            CorruptImageError: If the file cannot be decoded.
            DatasetNotFoundError: If the file listed for this item does not exist.
        """
        with self._opened(int(self._index[i])) as image:
            return describe_mode(image)

    def _load(self, source: int) -> Image.Image:
        with self._opened(source) as image:
            return to_rgb(image)

    @contextmanager
    def _opened(self, source: int) -> Iterator[Image.Image]:
        """The stored image; a decoding error inside the block becomes a one-sentence error."""
        if isinstance(self._items, np.ndarray):
            array = self._items[source]
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            yield Image.fromarray(np.ascontiguousarray(array))
            return
        path = self._items[source]
        try:
            with Image.open(path) as image:
                yield image
        except FileNotFoundError as err:
            raise DatasetNotFoundError(
                f"Image file {path} is listed in the dataset but does not exist; restore it or "
                "download the dataset again."
            ) from err
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            raise CorruptImageError(
                f"Image file {path} cannot be decoded ({err}); remove it from the split or "
                "replace it with an intact copy."
            ) from err

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """Return the items at ``indices`` (positions in this set), sharing the storage.

        Raises:
            DataError: If an index is out of range.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(
                f"Subset indices must lie in 0..{len(self) - 1} for this set of {len(self)} "
                f"images, got {idx.min()}..{idx.max()}; index into this set, not another one."
            )
        out = copy.copy(self)
        out._index = self._index[idx]
        out.labels = self.labels[idx]
        out.identities = [self.identities[j] for j in idx.tolist()]
        out.classnames = list(self.classnames)
        return out

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> ImageSet:
        """Return a view of the same images with another transform (e.g. train vs eval)."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def with_acquisition(self, profile: AcquisitionProfile | None) -> ImageSet:
        """A view of the same images as a site whose scanner is ``profile`` acquires them."""
        out = copy.copy(self)
        out.acquisition = profile
        return out

    def class_counts(self) -> np.ndarray:
        """Number of images per class, indexed by label id."""
        return np.bincount(self.labels, minlength=len(self.classnames))

    def content_fingerprint(self) -> str:
        """Hex digest that changes when an image's content may have changed; decodes nothing.

        Identities name images, not their content, so caches of derived data (frozen features)
        add this to their keys. A file contributes its size and modification time in
        nanoseconds (one ``stat``, no read; an absent file a marker, so decoding it reports the
        error); an in-memory image its shape and a strided sample of its pixels, since arrays
        read from a replaced file keep their identities. A simulated scanner alters what the
        images hold, so its profile's key is part of the fingerprint too.
        """
        digest = hashlib.sha256()
        if self.acquisition is not None:
            digest.update(f"acquisition={self.acquisition.key}|".encode())
        if isinstance(self._items, np.ndarray):
            shape = self._items.shape[1:]
            digest.update(f"array|{shape}|n={len(self._index)}".encode())
            per_image = int(np.prod(shape))
            flat = np.linspace(0, per_image - 1, min(per_image, _FINGERPRINT_SAMPLES), dtype=int)
            at = np.unravel_index(flat, shape)
            sample = self._items[(self._index[:, None], *(axis[None, :] for axis in at))]
            digest.update(np.ascontiguousarray(sample).tobytes())
            return digest.hexdigest()
        stamps = np.full((len(self._index), 2), -1, dtype=np.int64)
        for row, source in enumerate(self._index.tolist()):
            try:
                stat = os.stat(self._items[source])
            except OSError:
                continue
            stamps[row] = stat.st_size, stat.st_mtime_ns
        digest.update(f"files|n={len(self._index)}".encode())
        digest.update(stamps.tobytes())
        return digest.hexdigest()

    def __repr__(self) -> str:
        kind = "in-memory" if isinstance(self._items, np.ndarray) else "files"
        return f"ImageSet({len(self)} images, {len(self.classnames)} classes, {kind})"


@dataclass
class DatasetSplits:
    """A dataset's splits as every reader returns them; ``val`` is None when there is none."""

    name: str
    classnames: list[str]
    train: ImageSet
    val: ImageSet | None
    test: ImageSet

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of ``classnames``)."""
        return len(self.classnames)


def resolve_root(value: str | os.PathLike | None, default: str | os.PathLike = "data") -> Path:
    """Turn a configured data root into an absolute path, the same from any working folder.

    ``~`` is expanded and an OmegaConf interpolation left in a plain dict
    (``${oc.env:FEDPROMPT_DATA,data}``) is resolved, so a config behaves the same whether it
    arrives as a DictConfig or a dict. A relative root is taken against the current folder where
    it exists there, else against the project folder where it exists there, else against the
    current folder: relative roots in ready-made experiments (``../shared/data/btmri-mini``) then
    work from the project folder and from whatever folder a Flower process runs in.
    """
    text = str(default if value is None or str(value) == "" else value)
    if "${" in text:
        from omegaconf import OmegaConf

        text = str(OmegaConf.create({"value": text}).value)
    path = Path(text).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    from fedprompt.config import PROJECT_DIR  # imports Hydra: only when this fallback is needed

    beside_project = PROJECT_DIR / path
    return beside_project.resolve() if beside_project.exists() else path.resolve()


def config_classnames(cfg: Mapping[str, Any]) -> list[str] | None:
    """The ``classnames`` a config lists, or None when it lists none."""
    names = cfg.get("classnames")
    if names is None:
        return None
    if isinstance(names, str):
        raise DataError(
            f"`classnames` must be a list of names, got the string {names!r}; write it as a "
            "YAML list."
        )
    return [str(n) for n in names]
