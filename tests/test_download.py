"""Downloads without the network: offline messages, sha256 check, unpacking, atomic writes."""

import hashlib
import io
import json
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torchvision.datasets.utils
from PIL import Image

import fedprompt.data.download as download
from fedprompt.data import (
    DataError,
    DatasetNotFoundError,
    default_config,
    download_dataset,
    load_dataset,
    read_biomedcoop,
)

SPLIT = {
    "train": [["cls_a/a0.png", 0, "cls a"], ["cls_b/b0.png", 1, "cls b"]],
    "val": [],
    "test": [["cls_a/a1.png", 0, "cls a"], ["cls_b/b1.png", 1, "cls b"]],
}


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every network entry point fails unless a test replaces it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_hub(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline (test)")

    def no_url(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    def no_medmnist(*args, **kwargs):
        raise RuntimeError("offline (test)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(urllib.request, "urlopen", no_url)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", no_medmnist)


def _zip(path: Path, prefix: str, with_split: bool, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel, _, _ in SPLIT["train"] + SPLIT["test"]:
            buffer = io.BytesIO()
            Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="PNG")
            zf.writestr(f"{prefix}{rel}", buffer.getvalue())
        if with_split:
            zf.writestr("TOY/split_TOY.json", json.dumps(SPLIT))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def _serve_zip(monkeypatch, archive: Path, sha: str | None = None) -> list:
    calls = []

    def fake_download(repo_id, repo_type, filename, local_dir):
        calls.append((repo_id, repo_type, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    real = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(download, "hub_sha256", lambda filename: sha or real)
    return calls


def test_offline_biomedcoop_download_gives_the_manual_steps(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        download_dataset("btmri", tmp_path)
    message = str(info.value)
    assert "LocalEntryNotFoundError" in message
    assert "TahaKoleilat/BiomedCoOp" in message and "BTMRI.zip" in message
    assert str(tmp_path / "BTMRI" / "BTMRI") in message
    assert "raw.githubusercontent.com/HealthX-Lab/BiomedCoOp/main/data/BTMRI/split_BTMRI.json" in (
        message
    )
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_config_with_download_true_tries_then_reports(tmp_path):
    cfg = {**default_config("busi"), "root": str(tmp_path), "download": True}
    with pytest.raises(DatasetNotFoundError, match=r"BUSI\.zip"):
        load_dataset(cfg)


def test_zip_with_nested_layout_and_split_inside(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "src.zip", "TOY/TOY/", with_split=True)
    calls = _serve_zip(monkeypatch, archive)
    root = tmp_path / "data"
    folder = download.download_biomedcoop("TOY", root)
    assert calls == [("TahaKoleilat/BiomedCoOp", "dataset", "TOY.zip")]
    assert folder == root / "TOY"
    splits = read_biomedcoop(root, "TOY", classnames=["cls a", "cls b"])
    assert len(splits.train) == 2 and splits.train[1][0].getpixel((0, 0)) == (200, 10, 10)
    assert not (root / ".downloads" / "TOY.zip").exists()
    assert sorted(p.name for p in (root / "TOY").iterdir()) == ["TOY", "split_TOY.json"]


def test_flat_zip_with_split_from_github(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "src.zip", "", with_split=False)
    _serve_zip(monkeypatch, archive)
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return FakeResponse(json.dumps(SPLIT).encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "data"
    download.download_biomedcoop("TOY", root)
    assert urls == [download.SPLIT_URL.format(dir="TOY")]
    assert len(read_biomedcoop(root, "TOY").test) == 2


def test_checksum_mismatch_sets_the_file_aside(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "src.zip", "TOY/TOY/", with_split=True)
    _serve_zip(monkeypatch, archive, sha="0" * 64)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="sha256") as info:
        download.download_biomedcoop("TOY", root)
    aside = root / ".downloads" / "TOY.zip.sha256-mismatch"
    assert str(aside) in str(info.value)
    assert aside.is_file() and not (root / ".downloads" / "TOY.zip").exists()
    assert not (root / "TOY" / "TOY").exists()


def test_archive_without_the_listed_images(tmp_path, monkeypatch):
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("TOY/split_TOY.json", json.dumps(SPLIT))
        zf.writestr("TOY/other/x.png", b"")
    _serve_zip(monkeypatch, archive)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"cls_a/a0\.png"):
        download.download_biomedcoop("TOY", root)
    assert not (root / "TOY" / "TOY").exists()
    assert [p.name for p in (root / "TOY").iterdir()] == ["split_TOY.json"]


def test_unsafe_and_invalid_zips_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DataError, match="unsafe path"):
        download.unpack_biomedcoop_zip(evil, "TOY", tmp_path / "data")
    assert not (tmp_path / "escape.txt").exists()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK not really")
    with pytest.raises(DataError, match="not a valid zip"):
        download.unpack_biomedcoop_zip(broken, "TOY", tmp_path / "data")


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20))
    assert download.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_hub_sha256_prefers_lfs_info_and_falls_back_to_etag(monkeypatch):
    sha = "ab" * 32

    class Api:
        def get_paths_info(self, repo_id, paths, repo_type):
            assert (repo_id, paths, repo_type) == ("TahaKoleilat/BiomedCoOp", ["X.zip"], "dataset")
            return [SimpleNamespace(lfs=SimpleNamespace(sha256=sha.upper()))]

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert download.hub_sha256("X.zip") == sha

    class NoLfs:
        def get_paths_info(self, *args, **kwargs):
            return [SimpleNamespace(lfs=None)]

    monkeypatch.setattr(huggingface_hub, "HfApi", NoLfs)
    monkeypatch.setattr(
        huggingface_hub, "get_hf_file_metadata", lambda url: SimpleNamespace(etag=f'"{sha}"')
    )
    assert download.hub_sha256("X.zip") == sha
    monkeypatch.setattr(
        huggingface_hub, "get_hf_file_metadata", lambda url: SimpleNamespace(etag='"abc"')
    )
    with pytest.raises(DataError, match="no sha256"):
        download.hub_sha256("X.zip")


def test_fetch_url_is_atomic_and_validates(tmp_path, monkeypatch):
    dest = tmp_path / "split_TOY.json"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"<html>"))
    with pytest.raises(DataError, match="cannot be read as JSON"):
        download.fetch_url("https://example.invalid/split.json", dest)
    assert list(tmp_path.iterdir()) == []
    payload = json.dumps(SPLIT).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    download.fetch_url("https://example.invalid/split.json", dest)
    assert dest.read_bytes() == payload and list(tmp_path.iterdir()) == [dest]


def test_medmnist_download_failure_gives_the_manual_steps(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        download_dataset("pneumoniamnist", tmp_path)
    message = str(info.value)
    assert "zenodo.org" in message and "28209eda62fecd6e6a2d98b1501bb15f" in message
    assert str(tmp_path / "pneumoniamnist.npz") in message


def test_image_folder_has_no_source_and_synthetic_is_generated(tmp_path):
    with pytest.raises(DataError, match="no public download source"):
        download_dataset("image_folder", tmp_path)
    folder = download_dataset({**default_config("synthetic"), "train_per_class": 2}, tmp_path)
    assert (folder / f"split_{folder.name}.json").is_file()
