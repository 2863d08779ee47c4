"""Backbone loading: miniatures through local-dir, the once-per-process cache, offline errors."""

import copy
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
import torch
from no_network import cut_network
from PIL import Image

from fedprompt.backbones import (
    BackboneUnavailableError,
    build_miniature,
    clear_backbone_cache,
    default_cache_dir,
    list_backbones,
    load_backbone,
    save_local_copy,
)
from fedprompt.backbones import loader as loader_module
from fedprompt.backbones.miniature import MANIFEST_NAME, build_directory_atomically

KINDS = {"miniature": "hf_bert", "miniature-native": "native"}


@pytest.fixture(params=sorted(KINDS))
def any_miniature(request):
    fixture = "miniature_backbone" if request.param == "miniature" else "miniature_native_backbone"
    return request.getfixturevalue(fixture)


def test_list_backbones_names_every_spec_kind():
    assert list_backbones() == [
        "biomedclip",
        "biomedclip-random",
        "local-dir",
        "miniature",
        "miniature-native",
    ]


def test_unknown_spec_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone spec"):
        load_backbone("biomedclip-large")
    with pytest.raises(ValueError, match="local-dir"):
        load_backbone("local-dir:")


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FEDPROMPT_CACHE")
    assert default_cache_dir() == Path("~/.cache/fedprompt").expanduser()


def test_miniature_is_a_local_dir_loaded_by_the_production_path(
    miniature_backbone, backbone_cache_dir
):
    folder = backbone_cache_dir / "miniature-v1"
    config = json.loads((folder / "open_clip_config.json").read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str(folder) == text_cfg["hf_tokenizer_name"]
    assert (folder / "open_clip_pytorch_model.bin").is_file()
    assert (folder / "vocab.txt").is_file() and (folder / "config.json").is_file()
    direct = load_backbone(f"local-dir:{folder}")
    assert direct is not miniature_backbone
    loaded = direct.model.state_dict()
    for name, value in miniature_backbone.model.state_dict().items():
        assert torch.equal(value, loaded[name]), name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_miniature_has_the_expected_family(kind, request):
    fixture = "miniature_backbone" if kind == "miniature" else "miniature_native_backbone"
    backbone = request.getfixturevalue(fixture)
    assert backbone.spec == kind
    assert backbone.text_kind == KINDS[kind]
    assert backbone.embed_dim == 32
    assert backbone.device == torch.device("cpu")
    assert type(backbone.model).__name__ == ("CustomTextCLIP" if kind == "miniature" else "CLIP")


def test_backbone_is_frozen_and_in_eval_mode(any_miniature):
    model = any_miniature.model
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(module.training for module in model.modules())


def test_backbone_is_loaded_once_per_process(any_miniature, backbone_cache_dir):
    # Compared with a load of its own, not with the session fixture: a test that clears the
    # process cache (test_biomedclip_random_...) may have run in between.
    first = load_backbone(any_miniature.spec, device="cpu", cache_dir=backbone_cache_dir)
    assert load_backbone(any_miniature.spec, device="cpu", cache_dir=backbone_cache_dir) is first
    assert copy.deepcopy(first) is first
    assert copy.deepcopy(any_miniature) is any_miniature


def test_features_are_normalised_with_the_embedding_dim(any_miniature):
    torch.manual_seed(0)
    size = any_miniature.image_size
    images = any_miniature.encode_images(torch.randn(3, 3, size, size))
    texts = any_miniature.encode_text(any_miniature.tokenizer(["a photo of a glioma tumor."]))
    assert images.shape == (3, any_miniature.embed_dim) and images.dtype == torch.float32
    assert texts.shape == (1, any_miniature.embed_dim)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(1))
    assert not images.requires_grad
    assert any_miniature.logit_scale() == pytest.approx(1 / 0.07, rel=1e-5)
    assert any_miniature.num_parameters() > 0


def test_transforms_produce_model_sized_images(any_miniature):
    image = Image.new("RGB", (300, 200), color=(120, 60, 30))
    size = any_miniature.image_size
    assert any_miniature.preprocess(image).shape == (3, size, size)
    assert any_miniature.preprocess_train(image).shape == (3, size, size)


def test_miniature_build_is_deterministic(miniature_backbone, tmp_path):
    folder = build_miniature(tmp_path / "again")
    rebuilt = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    for name, value in miniature_backbone.model.state_dict().items():
        assert torch.equal(rebuilt[name], value), name


def test_complete_build_is_reused(tmp_path):
    folder = build_miniature(tmp_path / "mini")
    stamp = (folder / MANIFEST_NAME).stat().st_mtime_ns
    assert build_miniature(tmp_path / "mini") == folder
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns == stamp


def _build_slowly(target: str, out: str) -> None:
    def build(tmp: Path) -> None:
        (tmp / "payload.txt").write_text("payload")
        time.sleep(0.2)

    path = build_directory_atomically(target, build, {"kind": "test"})
    Path(out).write_text(str(path))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_concurrent_builds_agree_on_one_folder(tmp_path):
    target = tmp_path / "shared" / "model"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_build_slowly, args=(str(target), str(tmp_path / f"out{i}")))
        for i in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert {(tmp_path / f"out{i}").read_text() for i in range(4)} == {str(target)}
    assert (target / "payload.txt").read_text() == "payload"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no leftover temp dirs


def test_stale_folder_is_replaced_only_when_allowed(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "junk.txt").write_text("half-written")

    def build(tmp: Path) -> None:
        (tmp / "payload.txt").write_text("payload")

    with pytest.raises(FileExistsError):
        build_directory_atomically(target, build, {"kind": "test"}, replace_stale=False)
    assert build_directory_atomically(target, build, {"kind": "test"}) == target
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST_NAME, "payload.txt"]


def test_biomedclip_offline_without_cache_names_the_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(BackboneUnavailableError) as info:
        load_backbone("biomedclip")
    message = str(info.value)
    assert "backbone=local_dir" in message and "backbone=miniature" in message
    assert "HF_HUB_OFFLINE=1" in message and "fedprompt backbone save-local" in message
    assert info.value.__cause__ is not None


def test_biomedclip_hub_failure_is_wrapped(monkeypatch):
    import open_clip

    def unreachable(*args, **kwargs):
        raise RuntimeError("Failed initial config/weights load from HF Hub")

    monkeypatch.setattr(loader_module, "offline_requested", lambda: False)
    monkeypatch.setattr(loader_module, "unreachable", lambda url: None)  # the hub answers
    monkeypatch.setattr(open_clip, "create_model_from_pretrained", unreachable)
    with pytest.raises(BackboneUnavailableError, match="backbone=local_dir") as info:
        load_backbone("biomedclip")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_biomedclip_without_network_says_so_in_seconds(monkeypatch, tmp_path):
    attempts = cut_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(BackboneUnavailableError) as info:
        load_backbone("biomedclip")
    assert time.monotonic() - started < 5
    assert "huggingface.co:443 cannot be reached" in str(info.value)
    assert "backbone=local_dir" in str(info.value)
    assert len(attempts) == 1  # one connection attempt, no retries


def test_biomedclip_without_network_loads_a_cached_copy_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants
    import open_clip

    cut_network(monkeypatch)
    repo = loader_module.BIOMEDCLIP_HUB_ID.replace("/", "--")
    snapshot = tmp_path / "hub" / f"models--{repo}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc")
    (snapshot / "snapshots" / "abc").mkdir(parents=True)
    (snapshot / "snapshots" / "abc" / "open_clip_config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    seen = []

    def from_cache(*args, **kwargs):
        seen.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model_from_pretrained", from_cache)
    with pytest.raises(BackboneUnavailableError):
        load_backbone("biomedclip")
    assert seen == [True] and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_missing_local_dir_says_what_is_missing(tmp_path):
    with pytest.raises(BackboneUnavailableError, match="does not exist"):
        load_backbone(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(BackboneUnavailableError, match=r"no open_clip_config\.json"):
        load_backbone(f"local-dir:{tmp_path}")


def test_local_dir_without_weights_says_so(miniature_backbone, backbone_cache_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(backbone_cache_dir / "miniature-v1", folder)
    (folder / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(BackboneUnavailableError, match="no weights"):
        load_backbone(f"local-dir:{folder}")


def test_local_dir_with_a_hub_text_model_gets_a_hint(
    miniature_backbone, backbone_cache_dir, tmp_path, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network
    folder = tmp_path / "copy"
    shutil.copytree(backbone_cache_dir / "miniature-v1", folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "microsoft/BiomedNLP-BiomedBERT"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneUnavailableError, match="is no local folder"):
        load_backbone(f"local-dir:{folder}")


def test_save_local_copy_rehomes_a_copy(miniature_backbone, backbone_cache_dir, tmp_path):
    source = backbone_cache_dir / "miniature-v1"
    copy_dir = save_local_copy(tmp_path / "copy", source=f"local-dir:{source}")
    text_cfg = json.loads((copy_dir / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str(copy_dir) == text_cfg["hf_tokenizer_name"]
    copied = load_backbone(f"local-dir:{copy_dir}")
    tokens = miniature_backbone.tokenizer(["a photo of a normal brain."])
    torch.testing.assert_close(copied.tokenizer(["a photo of a normal brain."]), tokens)
    torch.testing.assert_close(copied.encode_text(tokens), miniature_backbone.encode_text(tokens))
    assert save_local_copy(copy_dir, source=f"local-dir:{source}") == copy_dir


@pytest.mark.slow
def test_biomedclip_random_has_biomedclips_architecture(backbone_cache_dir):
    backbone = load_backbone("biomedclip-random", cache_dir=backbone_cache_dir)
    try:
        assert backbone.text_kind == "hf_bert"
        assert (backbone.embed_dim, backbone.image_size) == (512, 224)
        assert backbone.num_parameters() == pytest.approx(196e6, rel=0.01)
        assert backbone.tokenizer(["a photo of a glioma tumor."]).shape == (1, 256)
        bert = backbone.model.text.transformer.config
        assert (bert.vocab_size, bert.hidden_size, bert.num_hidden_layers) == (30522, 768, 12)
        assert not any(p.requires_grad for p in backbone.model.parameters())
    finally:
        del backbone
        clear_backbone_cache()  # frees its 800 MB; the session fixtures keep their own objects
