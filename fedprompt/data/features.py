"""Frozen image features: each image (and augmented view) passes the image tower once, ever.

The image tower never changes, so its outputs are computed once and then reused across epochs,
rounds, sites of a process and runs: a per-process LRU bounded in bytes sits in front of the
on-disk ``FeatureStore`` (``feature_cache.py``). Training with augmentation encodes a fixed number
of seeded views per image (``augment.py``) instead of re-encoding every epoch; learners that need
patch tokens get them cached in fp16 within their own memory budget.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedprompt.backbones import Backbone, default_cache_dir
from fedprompt.backbones.preprocessing import NORMALIZATIONS, eval_transform, preprocess_config
from fedprompt.data.augment import AugmentationSettings, SeededViewTransform
from fedprompt.data.feature_cache import FeatureStore, backbone_identity, entry_key
from fedprompt.data.image_set import ImageSet

logger = logging.getLogger(__name__)

_MB = 1 << 20
ViewMaker = Callable[[Image.Image, str, int], torch.Tensor]


@dataclass(frozen=True)
class FeatureSettings:
    """The ``features`` config section: where and how much to cache, and the training views.

    Attributes:
        cache_dir: Folder of the on-disk cache; None keeps features in memory only.
        views: Augmented views cached per training image; 1 means the eval transform only.
        augmentation: How the views are drawn.
        memory_mb: Per-process memory for cached features (all sites of the process together).
        patch_tokens_budget_mb: Per-process memory for fp16 patch tokens; a set whose tokens
            alone exceed it reads them memory-mapped from the disk cache instead.
        batch_size: Images per forward pass of the image tower.
        num_workers: DataLoader worker processes that decode images (0: in this process).
        normalization: ``backbone`` (the backbone's own mean and std) or ``imagenet``; applies
            to every image the tower sees, training views and test images alike.
    """

    cache_dir: Path | None = None
    views: int = 1
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)
    memory_mb: float = 1024.0
    patch_tokens_budget_mb: float = 2048.0
    batch_size: int = 32
    num_workers: int = 0
    normalization: str = "backbone"

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> FeatureSettings:
        """Settings from a plain ``features`` mapping; absent keys keep their defaults.

        ``cache_dir`` null (or absent) means ``$FEDPROMPT_CACHE/features``; ``false`` or ``""``
        turns the disk cache off.

        Raises:
            ValueError: ``views`` or ``batch_size`` below 1, a negative budget, or an unknown
                normalization.
        """
        section = dict(section or {})
        directory = section.get("cache_dir")
        if directory is None:
            cache_dir: Path | None = default_cache_dir() / "features"
        elif directory is False or str(directory) == "":
            cache_dir = None
        else:
            cache_dir = Path(os.path.expanduser(str(directory))).absolute()
        settings = cls(
            cache_dir=cache_dir,
            views=int(section.get("views", cls.views)),
            augmentation=AugmentationSettings.from_config(section.get("augmentation")),
            memory_mb=float(section.get("memory_mb", cls.memory_mb)),
            patch_tokens_budget_mb=float(
                section.get("patch_tokens_budget_mb", cls.patch_tokens_budget_mb)
            ),
            batch_size=int(section.get("batch_size", cls.batch_size)),
            num_workers=int(section.get("num_workers", cls.num_workers)),
            normalization=str(section.get("normalization", cls.normalization)),
        )
        if settings.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"features.normalization must be one of {', '.join(NORMALIZATIONS)}, "
                f"got {settings.normalization!r}"
            )
        if settings.views < 1 or settings.batch_size < 1 or settings.num_workers < 0:
            raise ValueError(
                f"features.views and features.batch_size must be at least 1 and "
                f"features.num_workers at least 0, got {settings.views}, {settings.batch_size} "
                f"and {settings.num_workers}"
            )
        if settings.memory_mb < 0 or settings.patch_tokens_budget_mb < 0:
            raise ValueError("features.memory_mb and features.patch_tokens_budget_mb must be >= 0")
        return settings


@dataclass(frozen=True)
class CachedViews:
    """A training set's cached inputs: every view's features and, if asked for, patch tokens.

    Attributes:
        features: L2-normalised float32 features (N, V, D) of the V views of each image.
        labels: Labels (N,).
        patch_tokens: One fp16 tensor (N, P, Dp) per view, or None when not cached.
    """

    features: torch.Tensor
    labels: torch.Tensor
    patch_tokens: tuple[torch.Tensor, ...] | None = None

    @property
    def num_views(self) -> int:
        """Number of cached views per image."""
        return int(self.features.shape[1])


class _ViewDataset(Dataset):
    """Items ``(views (v, 3, H, W), label)``: each image decoded once for all its views."""

    def __init__(self, images: ImageSet, make_view: ViewMaker, views: Sequence[int]) -> None:
        self.images = images.with_transform(None)
        self.make_view = make_view
        self.views = list(views)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[i]
        identity = self.images.identities[i]
        return torch.stack([self.make_view(image, identity, v) for v in self.views]), label


@torch.no_grad()
def encode_views(
    backbone: Backbone,
    images: ImageSet,
    make_view: ViewMaker,
    views: Sequence[int],
    *,
    patch_tokens: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Encode the given views of every image; a fresh computation, no cache involved.

    Each image is decoded once and all its requested views go through the tower together, about
    ``batch_size`` views per forward pass. On CUDA, batches are pinned and copied asynchronously.

    Returns:
        Per view, L2-normalised float32 features (N, D) on the CPU; and per view fp16 patch
        tokens (N, P, Dp) on the CPU when ``patch_tokens``, else None.
    """
    views = list(views)
    count = len(images)
    loader = DataLoader(
        _ViewDataset(images, make_view, views),
        batch_size=max(1, batch_size // len(views)),
        num_workers=num_workers,
        pin_memory=backbone.device.type == "cuda",
    )
    # Outputs are filled in place, batch by batch, so the peak is the result plus one batch.
    features = [torch.empty(count, backbone.embed_dim) for _ in views]
    tokens: list[torch.Tensor] | None = None
    row = 0
    for pixels, _ in tqdm(loader, desc=progress, disable=progress is None, leave=False):
        size = pixels.shape[0]
        flat = pixels.flatten(0, 1)
        if patch_tokens:
            pooled, patches = backbone.encode_image_tokens(flat)
            patches = patches.to(torch.float16).cpu().unflatten(0, (size, len(views)))
            if tokens is None:
                shape = (count, *patches.shape[2:])
                tokens = [torch.empty(shape, dtype=torch.float16) for _ in views]
            for j, out in enumerate(tokens):
                out[row : row + size] = patches[:, j]
        else:
            pooled = backbone.encode_images(flat)
        pooled = pooled.cpu().unflatten(0, (size, len(views)))
        for j, out in enumerate(features):
            out[row : row + size] = pooled[:, j]
        row += size
    if patch_tokens and tokens is None:
        tokens = [torch.empty(0, 0, backbone.embed_dim, dtype=torch.float16) for _ in views]
    return features, tokens


def encode_image_set(
    backbone: Backbone,
    images: ImageSet,
    batch_size: int = 128,
    progress: str | None = None,
    normalization: str = "backbone",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) on the CPU and labels (N,) for ``images``, uncached.

    The backbone's eval transform is applied, as the papers do at test time.
    """
    (features,), _ = encode_views(
        backbone,
        images,
        _eval_view(backbone, normalization),
        [0],
        batch_size=batch_size,
        progress=progress,
    )
    return features, _labels(images)


class _EvalView:
    """The backbone's eval transform as a view maker; a class, so DataLoader workers pickle it."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image, identity: str, view: int) -> torch.Tensor:
        return self.preprocess(image)


def _eval_view(backbone: Backbone, normalization: str) -> _EvalView:
    return _EvalView(eval_transform(backbone, normalization))


def _labels(images: ImageSet) -> torch.Tensor:
    return torch.as_tensor(images.labels, dtype=torch.long).clone()


class _ByteLRU:
    """Least-recently-used tensors, evicted once their total size passes ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> bool:
        """Keep ``value`` unless it alone exceeds the budget; returns whether it was kept."""
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return False
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = value
        self.bytes += size
        self.shrink()
        return True

    def shrink(self) -> None:
        while self.bytes > self.max_bytes and self.entries:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class FeatureCache:
    """Per-process cache of encoded image sets: memory (bounded in bytes) over an optional disk.

    Every site a process serves shares it, so its memory does not grow with the number of sites
    beyond the budgets. Thread-safe; two threads asking for the same missing entry may both
    encode it, with the same result. ``FeatureSettings()`` (the default, before ``configure``)
    keeps features in memory only.

    Args:
        settings: Budgets and the disk folder; ``configure`` changes them later.

    Attributes:
        encoded_views: Image views this cache has sent through the image tower (for tests and
            benchmarks: a cache hit adds nothing).
    """

    def __init__(self, settings: FeatureSettings | None = None) -> None:
        self._lock = threading.Lock()
        self.settings = FeatureSettings()
        self._features = _ByteLRU(0)
        self._tokens = _ByteLRU(0)
        self._store: FeatureStore | None = None
        self.encoded_views = 0
        self.configure(settings or FeatureSettings())

    def configure(self, settings: FeatureSettings) -> None:
        """Adopt new budgets and disk folder; entries beyond a smaller budget are evicted."""
        with self._lock:
            self.settings = settings
            self._features.max_bytes = int(settings.memory_mb * _MB)
            self._tokens.max_bytes = int(settings.patch_tokens_budget_mb * _MB)
            self._features.shrink()
            self._tokens.shrink()
            directory = settings.cache_dir
            if directory is None:
                self._store = None
            elif self._store is None or self._store.directory != directory:
                self._store = FeatureStore(directory)

    @property
    def memory_bytes(self) -> int:
        """Bytes of tensors held in memory (features and patch tokens)."""
        with self._lock:
            return self._features.bytes + self._tokens.bytes

    def get(
        self,
        backbone: Backbone,
        images: ImageSet,
        batch_size: int = 128,
        progress: str | None = None,
        *,
        normalization: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) and labels (N,) of ``images`` under the eval transform.

        ``normalization`` None means the one this cache was configured with.
        """
        make_view = _eval_view(backbone, normalization or self.settings.normalization)
        (features,), _ = self._views(
            backbone,
            images,
            repr(make_view.preprocess),
            make_view,
            [0],
            patch_tokens=False,
            batch_size=batch_size,
            progress=progress,
        )
        return features, _labels(images)

    def training_views(
        self,
        backbone: Backbone,
        images: ImageSet,
        settings: FeatureSettings | None = None,
        *,
        patch_tokens: bool = False,
        progress: str | None = None,
    ) -> CachedViews:
        """``settings.views`` views of a training set, with patch tokens if asked for.

        One view means the eval transform; more mean seeded augmented views, view ``k`` keyed by
        its index, so raising ``views`` encodes only the new ones.

        Args:
            backbone: The frozen backbone.
            images: The training images.
            settings: Views, augmentation and batch size; the cache's own settings if None.
            patch_tokens: Also return fp16 patch tokens (for learners that need them).
            progress: Progress-bar label while encoding; None shows none.
        """
        settings = settings or self.settings
        if settings.views == 1:
            view = _eval_view(backbone, settings.normalization)
            preprocessing, make_view = repr(view.preprocess), view
        else:
            transform = SeededViewTransform.for_backbone(
                preprocess_config(backbone, settings.normalization), settings.augmentation
            )
            preprocessing, make_view = repr(transform), transform
        features, tokens = self._views(
            backbone,
            images,
            preprocessing,
            make_view,
            list(range(settings.views)),
            patch_tokens=patch_tokens,
            batch_size=settings.batch_size,
            progress=progress,
        )
        return CachedViews(
            features=torch.stack(features, dim=1),
            labels=_labels(images),
            patch_tokens=tuple(tokens) if tokens is not None else None,
        )

    def _views(
        self,
        backbone: Backbone,
        images: ImageSet,
        preprocessing: str,
        make_view: ViewMaker,
        views: Sequence[int],
        *,
        patch_tokens: bool,
        batch_size: int,
        progress: str | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        backbone_id = backbone_identity(backbone)
        content = images.content_fingerprint()
        keys = {
            v: entry_key(backbone_id, preprocessing, v, images.identities, content) for v in views
        }
        features: dict[int, torch.Tensor] = {}
        tokens: dict[int, torch.Tensor] = {}
        missing = []
        for view, key in keys.items():
            found = self._lookup(backbone_id, key, patch_tokens)
            if found is None:
                missing.append(view)
            else:
                features[view], token = found
                if token is not None:
                    tokens[view] = token
        if missing:
            encoded, encoded_tokens = encode_views(
                backbone,
                images,
                make_view,
                missing,
                patch_tokens=patch_tokens,
                batch_size=batch_size,
                num_workers=self.settings.num_workers,
                progress=progress,
            )
            with self._lock:
                self.encoded_views += len(missing) * len(images)
            meta = {"spec": backbone.spec, "preprocessing": preprocessing, "images": len(images)}
            for j, view in enumerate(missing):
                token = encoded_tokens[j] if encoded_tokens is not None else None
                features[view], token = self._keep(
                    backbone_id, keys[view], encoded[j], token, meta | {"view": view}
                )
                if token is not None:
                    tokens[view] = token
        ordered = [features[v] for v in views]
        return ordered, [tokens[v] for v in views] if patch_tokens else None

    def _lookup(
        self, backbone_id: str, key: str, patch_tokens: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """An entry's features (and tokens, if wanted) from memory, else disk, else None."""
        with self._lock:
            features = self._features.get(key)
            tokens = self._tokens.get(key) if patch_tokens else None
            store, budget = self._store, self._tokens.max_bytes
        if features is None and store is not None:
            loaded = store.load(backbone_id, key, "features")
            if loaded is not None:
                features = loaded["features"]
                with self._lock:
                    self._features.put(key, features)
        if features is None:
            return None
        if not patch_tokens or tokens is not None:
            return features, tokens
        if store is None:
            return None
        try:
            too_big = store.path(backbone_id, key, "tokens").stat().st_size > budget
        except OSError:
            return None
        loaded = store.load(backbone_id, key, "tokens", mmap=too_big)
        if loaded is None:
            return None
        tokens = loaded["tokens"]
        if not too_big:
            with self._lock:
                self._tokens.put(key, tokens)
        return features, tokens

    def _keep(
        self,
        backbone_id: str,
        key: str,
        features: torch.Tensor,
        tokens: torch.Tensor | None,
        meta: Mapping[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store a freshly encoded entry; tokens over budget come back memory-mapped from disk.

        Raises:
            MemoryError: Tokens exceed the budget and there is no disk cache to map them from.
        """
        with self._lock:
            store = self._store
            self._features.put(key, features)
            kept = tokens is not None and self._tokens.put(key, tokens)
        if store is not None and len(features):
            store.save(backbone_id, key, "features", {"features": features}, meta)
        if tokens is None:
            return features, None
        written = None
        if store is not None and len(tokens):
            written = store.save(backbone_id, key, "tokens", {"tokens": tokens}, meta)
        if kept:
            return features, tokens
        mapped = None
        if store is not None and written is not None:
            mapped = store.load(backbone_id, key, "tokens", mmap=True)
        if mapped is None:
            size_mb = tokens.numel() * tokens.element_size() / _MB
            raise MemoryError(
                f"Patch tokens of {meta['images']} images take {size_mb:.0f} MB, more than "
                f"features.patch_tokens_budget_mb={self.settings.patch_tokens_budget_mb:g}, and "
                "there is no writable disk cache to map them from; raise the budget, set "
                "features.cache_dir, or lower features.views."
            )
        logger.info(
            "Patch tokens of %d images (%.0f MB) exceed the memory budget; reading them "
            "memory-mapped from the disk cache.",
            meta["images"],
            tokens.numel() * tokens.element_size() / _MB,
        )
        return features, mapped["tokens"]

    def clear(self) -> None:
        """Forget every entry held in memory (the disk cache stays)."""
        with self._lock:
            self._features.clear()
            self._tokens.clear()


PROCESS_FEATURE_CACHE = FeatureCache()
