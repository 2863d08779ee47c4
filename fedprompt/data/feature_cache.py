"""On-disk store of frozen image features: keyed, validated on read, written atomically.

A cache entry is one image set seen through one preprocessing (the eval transform, or augmented
view ``k``) by one backbone. Its key hashes:

- the backbone's identity: its spec, a fingerprint of the image tower's weights (a strided sample
  of every tensor, so a different checkpoint in the same ``local-dir:`` folder is a different
  backbone) and the numeric path (fp32 on the CPU, bf16 autocast on CUDA);
- the preprocessing (the transform's ``repr``, which names every parameter) and the view index;
- the ordered image identities (``ImageSet.identities``) and their content fingerprint
  (``ImageSet.content_fingerprint``: each file's size and modification time in nanoseconds, or a
  strided pixel sample of each in-memory image), so an image replaced under its old name misses;
  a site's simulated scanner (``acquisition.py``) adds its profile's key to that fingerprint, so
  features of one profile are never served for another.

Files live under ``<cache_dir>/<backbone id>/<entry>.<kind>.pt``. Each holds its own key and a
SHA-256 of every tensor's bytes; a file that cannot be read, belongs to another key or fails its
checksum is logged, deleted and rebuilt, never used. Writers write a temporary file beside the
target and ``os.replace`` it, so processes that build the same entry at once (Ray actors) leave
one complete file and readers never see a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedprompt.backbones import Backbone

logger = logging.getLogger(__name__)

FORMAT = 1
_SAMPLES_PER_TENSOR = 256
_IDENTITIES: weakref.WeakKeyDictionary[Backbone, str] = weakref.WeakKeyDictionary()
_IDENTITIES_LOCK = threading.Lock()


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def backbone_identity(backbone: Backbone) -> str:
    """Hex id of what makes a backbone's image features what they are (memoised per backbone).

    Hashes the spec, the compute path and a strided sample of every image-tower tensor: a few
    milliseconds even for BiomedCLIP, and any other checkpoint differs in the sample.
    """
    with _IDENTITIES_LOCK:
        known = _IDENTITIES.get(backbone)
    if known is not None:
        return known
    digest = hashlib.sha256()
    path = "cuda-bf16" if backbone.device.type == "cuda" else f"{backbone.device.type}-fp32"
    digest.update(f"format={FORMAT}|spec={backbone.spec}|path={path}".encode())
    for name, tensor in backbone.model.visual.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float64)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    identity = digest.hexdigest()
    with _IDENTITIES_LOCK:
        _IDENTITIES[backbone] = identity
    return identity


def entry_key(
    backbone_id: str, preprocessing: str, view: int, identities: Sequence[str], content: str
) -> str:
    """Hex key of one image set seen through one preprocessing and view by one backbone.

    Args:
        backbone_id: ``backbone_identity`` of the backbone.
        preprocessing: The transform's ``repr``.
        view: The view index.
        identities: The images' identities, in order.
        content: ``ImageSet.content_fingerprint()`` of the images, so that an image replaced under
            the same name is a different entry.
    """
    digest = hashlib.sha256()
    digest.update(
        f"{backbone_id}|{preprocessing}|view={view}|content={content}|n={len(identities)}".encode()
    )
    for identity in identities:
        digest.update(identity.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class FeatureStore:
    """A folder of validated feature files, shared by processes and runs.

    Args:
        directory: The cache folder; created on first write.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self._verified: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()

    def path(self, backbone_id: str, key: str, kind: str) -> Path:
        """Where the ``kind`` file (``features`` or ``tokens``) of an entry lives."""
        return self.directory / backbone_id[:16] / f"{key[:40]}.{kind}.pt"

    def load(
        self, backbone_id: str, key: str, kind: str, *, mmap: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when absent; a damaged or stale file is deleted.

        Args:
            backbone_id: ``backbone_identity`` of the backbone.
            key: ``entry_key`` of the entry.
            kind: ``features`` or ``tokens``.
            mmap: Map the tensors from the file instead of reading them into memory; the checksum
                is then verified once per process and file version.
        """
        path = self.path(backbone_id, key, kind)
        try:
            stat = path.stat()
        except OSError:  # absent, or a folder on the way is not one
            return None
        stamp = (str(path), stat.st_mtime_ns, stat.st_size)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except FileNotFoundError:
            return None
        except Exception as err:  # any unreadable file is rebuilt, whatever the reader raised
            self._discard(path, f"unreadable ({type(err).__name__}: {err})")
            return None
        with self._lock:
            verified = mmap and stamp in self._verified
        problem = None if verified else _problem(payload, key, kind)
        if problem is not None:
            self._discard(path, problem)
            return None
        if mmap:
            with self._lock:
                self._verified.add(stamp)
        return dict(payload["tensors"])

    def save(
        self,
        backbone_id: str,
        key: str,
        kind: str,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
    ) -> Path | None:
        """Write an entry atomically; returns its path, or None when the folder is not writable.

        A cache that cannot be written only costs speed, so the error is logged, not raised.
        """
        path = self.path(backbone_id, key, kind)
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        payload = {
            "format": FORMAT,
            "key": key,
            "kind": kind,
            "meta": json.dumps(dict(meta), sort_keys=True, default=str),
            "tensors": contiguous,
            "checksums": {name: _tensor_digest(t) for name, t in contiguous.items()},
        }
        tmp_name = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(handle, "wb") as file:
                torch.save(payload, file)
            os.replace(tmp_name, path)
            tmp_name = None
        except OSError as err:
            logger.warning("Feature cache %s cannot be written (%s); going on without.", path, err)
            return None
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return path

    def _discard(self, path: Path, reason: str) -> None:
        logger.warning("Feature cache file %s is %s; deleting it to rebuild it.", path, reason)
        with contextlib.suppress(OSError):
            path.unlink()


def _problem(payload: Any, key: str, kind: str) -> str | None:
    """Why a loaded payload must not be used, or None when it is sound."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return "of another format"
    if payload.get("key") != key or payload.get("kind") != kind:
        return "stale (written for another key)"
    tensors, checksums = payload.get("tensors"), payload.get("checksums")
    if not isinstance(tensors, dict) or not isinstance(checksums, dict) or not tensors:
        return "incomplete"
    if set(tensors) != set(checksums):
        return "incomplete (tensors and checksums differ)"
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or _tensor_digest(tensor) != checksums[name]:
            return f"corrupt (checksum of {name!r} does not match)"
    return None
