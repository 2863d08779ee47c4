"""Fetch datasets for real users: BiomedCoOp zips from the Hugging Face hub, MedMNIST npz files."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedprompt.data.biomedcoop import (
    HF_REPO_ID,
    SPLIT_URL,
    BiomedCoOpPaths,
    manual_steps,
    read_split_file,
)
from fedprompt.data.image_set import DataError, DatasetNotFoundError, resolve_root
from fedprompt.data.medmnist_reader import download_medmnist
from fedprompt.data.synthetic import DEFAULT_ROOT as SYNTHETIC_ROOT
from fedprompt.data.synthetic import generate_synthetic
from fedprompt.network import offline_requested, quiet_hub_retries, unreachable

_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def download_dataset(cfg: Mapping[str, Any] | str, root: str | Path | None = None) -> Path:
    """Make the dataset a config describes available under ``root`` and return where it is.

    BiomedCoOp sets: the zip from the hub (sha256-checked), unpacked to ``<root>/<DIR>/<DIR>/``,
    and the split file from the BiomedCoOp GitHub repository (or the zip, if it has one).
    MedMNIST: the npz through the medmnist package (md5-checked). Synthetic: generated.
    Nothing already complete is fetched again, and no final file is ever half-written.

    Args:
        cfg: A dataset config, or the name of a known dataset.
        root: Where to put it; defaults to the config's ``root``.

    Raises:
        DatasetNotFoundError: If a download fails (offline, ...); the message gives the
            manual steps.
        DataError: On a checksum mismatch or an unusable archive, or for a format without a
            public source.
    """
    if isinstance(cfg, str):
        from fedprompt.data.registry import default_config

        cfg = default_config(cfg)
    fmt = cfg.get("format")
    name = str(cfg.get("name") or "")
    if fmt == "biomedcoop":
        base = resolve_root(root if root is not None else cfg.get("root"))
        return download_biomedcoop(str(cfg["dir"]), base)
    if fmt == "medmnist":
        base = resolve_root(root if root is not None else cfg.get("root"))
        return download_medmnist(str(cfg["flag"]).lower(), int(cfg.get("size") or 28), base)
    if fmt == "synthetic":
        base = resolve_root(root if root is not None else cfg.get("root"), default=SYNTHETIC_ROOT)
        return generate_synthetic(
            base,
            **{
                k: cfg[k]
                for k in (
                    "num_classes",
                    "train_per_class",
                    "val_per_class",
                    "test_per_class",
                    "image_size",
                    "seed",
                )
                if k in cfg
            },
        )
    raise DataError(
        f"Dataset {name or '?'!r} (format {fmt!r}) has no public download source; copy its "
        "images into the folder its config's `root` names."
    )


def download_biomedcoop(dir_name: str, root: Path) -> Path:
    """Place a BiomedCoOp dataset at ``<root>/<DIR>/`` and return that folder.

    Raises:
        DatasetNotFoundError: If the zip or the split file cannot be fetched.
        DataError: On a checksum mismatch or an archive without the expected images.
    """
    from huggingface_hub import constants

    paths = BiomedCoOpPaths(root, dir_name)
    steps = f"place it by hand: {manual_steps(dir_name, root)}."
    # Offline, say so in seconds rather than after the hub's retries (offline_requested: the hub
    # itself then fails at once).
    if not paths.image_dir.is_dir() and not offline_requested():
        reason = unreachable(constants.ENDPOINT)
        if reason:
            raise DatasetNotFoundError(
                f"Downloading {dir_name}.zip from the Hugging Face dataset repository "
                f"{HF_REPO_ID} is not possible: {reason}; check the connection and retry, or "
                f"{steps}"
            )
    paths.dataset_dir.mkdir(parents=True, exist_ok=True)
    split_error: Exception | None = None
    if not paths.split_file.is_file():
        try:
            fetch_url(SPLIT_URL.format(dir=dir_name), paths.split_file)
        except Exception as err:
            split_error = err
    if not paths.image_dir.is_dir():
        archive = fetch_hub_zip(dir_name, root, steps)
        unpack_biomedcoop_zip(archive, dir_name, root)
        archive.unlink(missing_ok=True)
    if not paths.split_file.is_file():
        raise DatasetNotFoundError(
            f"The split file for {dir_name} could not be fetched from "
            f"{SPLIT_URL.format(dir=dir_name)} ({split_error}) and the archive has none; save "
            f"that file as {paths.split_file}."
        )
    return paths.dataset_dir


def hub_sha256(filename: str) -> str:
    """The sha256 the hub lists for an LFS file of the BiomedCoOp dataset repository.

    Raises:
        DataError: If the hub does not give one.
    """
    import huggingface_hub

    errors = []
    try:
        infos = huggingface_hub.HfApi().get_paths_info(HF_REPO_ID, [filename], repo_type="dataset")
        lfs = getattr(infos[0], "lfs", None) if infos else None
        if lfs is not None:
            return str(lfs.sha256).lower()
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
    try:
        url = huggingface_hub.hf_hub_url(HF_REPO_ID, filename, repo_type="dataset")
        etag = (huggingface_hub.get_hf_file_metadata(url).etag or "").strip('"').lower()
        if _SHA256.fullmatch(etag):
            return etag
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
    reason = "; ".join(errors) or "it is not an LFS file"
    raise DataError(
        f"The hub gave no sha256 for {filename} in {HF_REPO_ID} ({reason}), so the download "
        "cannot be verified; try again later."
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_hub_zip(dir_name: str, root: Path, steps: str) -> Path:
    """Download ``<DIR>.zip`` from the hub into ``<root>/.downloads/`` and verify its sha256.

    A file that fails the check is renamed to ``*.sha256-mismatch`` and never unpacked.

    Raises:
        DatasetNotFoundError: If the download fails.
        DataError: On a checksum mismatch.
    """
    import huggingface_hub

    filename = f"{dir_name}.zip"
    try:
        with quiet_hub_retries():
            local = Path(
                huggingface_hub.hf_hub_download(
                    repo_id=HF_REPO_ID,
                    repo_type="dataset",
                    filename=filename,
                    local_dir=root / ".downloads",
                )
            )
    except Exception as err:
        raise DatasetNotFoundError(
            f"Downloading {filename} from the Hugging Face dataset repository {HF_REPO_ID} "
            f"failed ({type(err).__name__}: {err}); check the connection and retry, or {steps}"
        ) from err
    with quiet_hub_retries():
        expected = hub_sha256(filename)
    actual = sha256_file(local)
    if actual != expected:
        aside = local.with_name(f"{local.name}.sha256-mismatch")
        os.replace(local, aside)
        raise DataError(
            f"{filename} has sha256 {actual} but the hub lists {expected}; the file was moved "
            f"to {aside} and not used: delete it and download again."
        )
    return local


def unpack_biomedcoop_zip(archive: Path, dir_name: str, root: Path) -> Path:
    """Unpack a BiomedCoOp zip so the images end up in ``<root>/<DIR>/<DIR>/``.

    The archive is extracted into a temporary folder beside the target; the image folder
    is found by locating the split file's first image in it, then renamed into place. A
    split file inside the archive is used when none is in place yet.

    Raises:
        DataError: If the archive is not a valid zip, has unsafe paths, or lacks the images.
        DatasetNotFoundError: If there is no split file to locate the images with.
    """
    paths = BiomedCoOpPaths(root, dir_name)
    paths.dataset_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-unpack-{dir_name}-", dir=paths.dataset_dir))
    try:
        _extract(archive, tmp)
        if not paths.split_file.is_file():
            found = sorted(tmp.rglob(paths.split_file.name))
            if not found:
                raise DatasetNotFoundError(
                    f"{archive.name} has no {paths.split_file.name} and none is in place; save "
                    f"{SPLIT_URL.format(dir=dir_name)} as {paths.split_file}."
                )
            read_split_file(found[0])
            os.replace(found[0], paths.split_file)
        entries = read_split_file(paths.split_file)
        first = next(rows[0][0] for rows in entries.values() if rows)
        candidates = [tmp / dir_name / dir_name, tmp / dir_name, tmp]
        candidates += sorted(p for p in tmp.glob("*/*") if p.is_dir())
        candidates += sorted(p for p in tmp.glob("*/*/*") if p.is_dir())
        source = next((c for c in candidates if (c / first).is_file()), None)
        if source is None:
            raise DataError(
                f"{archive.name} does not contain {first} (the split file's first image) in any "
                f"expected place; unpack it by hand so that the class folders lie in "
                f"{paths.image_dir}/."
            )
        os.replace(source, paths.image_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths.image_dir


def _extract(archive: Path, target: Path) -> None:
    """Extract every member with a progress bar, refusing paths that leave ``target``."""
    base = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                dest = (base / member.filename).resolve()
                if dest != base and base not in dest.parents:
                    raise DataError(
                        f"{archive} contains the unsafe path {member.filename!r}; do not use "
                        "this archive."
                    )
            total = sum(m.file_size for m in members)
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"Unpacking {archive.name}"
            ) as bar:
                for member in members:
                    zf.extract(member, base)
                    bar.update(member.file_size)
    except zipfile.BadZipFile as err:
        raise DataError(
            f"{archive} is not a valid zip file ({err}); delete it and download it again."
        ) from err


def fetch_url(url: str, dest: Path) -> Path:
    """Download a split json to ``dest`` with a progress bar, via a temporary file.

    Raises:
        OSError: If the request fails (urllib's errors are OSErrors).
        DataError: If the payload is not a BiomedCoOp split file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            with tqdm(
                total=int(length) if length else None,
                unit="B",
                unit_scale=True,
                desc=f"Downloading {dest.name}",
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        read_split_file(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
