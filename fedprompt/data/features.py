"""Frozen image features: each image passes the image tower once per process, not once per epoch."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedprompt.backbones import Backbone
from fedprompt.data.image_set import ImageSet


def _fingerprint(backbone: Backbone, images: ImageSet) -> str:
    digest = hashlib.sha256()
    digest.update(f"{backbone.spec}|{backbone.device}|{backbone.image_size}".encode())
    for identity in images.identities:
        digest.update(identity.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@torch.no_grad()
def encode_image_set(
    backbone: Backbone, images: ImageSet, batch_size: int = 128, progress: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) on the CPU and labels (N,) for ``images``.

    The backbone's own eval transform is applied, as the papers do at test time.
    """
    loader = DataLoader(images.with_transform(backbone.preprocess), batch_size=batch_size)
    features, labels = [], []
    for pixels, batch_labels in tqdm(loader, desc=progress, disable=progress is None, leave=False):
        features.append(backbone.encode_images(pixels).float().cpu())
        labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
    if not features:
        return torch.empty(0, backbone.embed_dim), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


class FeatureCache:
    """In-process cache of encoded image sets, keyed by backbone and image identities.

    Bounded by entry count so a long simulation over many sites cannot grow without limit.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(
        self,
        backbone: Backbone,
        images: ImageSet,
        batch_size: int = 128,
        progress: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of ``images``, encoded on first use."""
        key = _fingerprint(backbone, images)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        encoded = encode_image_set(backbone, images, batch_size, progress)
        with self._lock:
            self._entries[key] = encoded
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return encoded

    def clear(self) -> None:
        """Forget every entry (tests, or to free memory)."""
        with self._lock:
            self._entries.clear()


PROCESS_FEATURE_CACHE = FeatureCache()
