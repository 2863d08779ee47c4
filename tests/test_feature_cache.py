import copy
import dataclasses
import hashlib
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from PIL import Image
from torchvision import transforms

from fedprompt.backbones import Backbone
from fedprompt.data.acquisition import draw_profile
from fedprompt.data.augment import AugmentationSettings, SeededViewTransform
from fedprompt.data.feature_cache import FeatureStore, backbone_identity, entry_key
from fedprompt.data.features import (
    FeatureCache,
    FeatureSettings,
    encode_image_set,
    encode_views,
)
from fedprompt.data.image_set import ImageSet


def _images(count=6, seed=0, prefix="img"):
    """Small in-memory RGB images of random content, with stable identities."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, 40, 52, 3), dtype=np.uint8)
    return ImageSet(
        pixels, np.arange(count) % 2, ["a", "b"], [f"{prefix}/{i}" for i in range(count)]
    )


def _settings(tmp_path, **changes):
    return dataclasses.replace(FeatureSettings(cache_dir=tmp_path, batch_size=64), **changes)


def _augmented(backbone, settings):
    return SeededViewTransform.for_backbone(
        backbone.model.visual.preprocess_cfg, settings.augmentation
    )


def test_cached_features_equal_a_fresh_computation(miniature_backbone, tmp_path):
    images = _images()
    cache = FeatureCache(_settings(tmp_path))
    first, labels = cache.get(miniature_backbone, images)
    fresh, fresh_labels = encode_image_set(miniature_backbone, images, batch_size=64)
    assert torch.equal(first, fresh) and torch.equal(labels, fresh_labels)
    assert torch.equal(cache.get(miniature_backbone, images)[0], fresh)  # from memory
    cache.clear()
    assert torch.equal(cache.get(miniature_backbone, images)[0], fresh)  # from disk
    assert cache.encoded_views == len(images)
    assert first.shape == (len(images), miniature_backbone.embed_dim)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(len(images)))


def test_augmented_views_are_cached_and_equal_a_fresh_computation(miniature_backbone, tmp_path):
    images = _images()
    settings = _settings(tmp_path, views=3)
    cache = FeatureCache(settings)
    cached = cache.training_views(miniature_backbone, images, patch_tokens=True)
    fresh, tokens = encode_views(
        miniature_backbone,
        images,
        _augmented(miniature_backbone, settings),
        [0, 1, 2],
        patch_tokens=True,
        batch_size=64,
    )
    assert cached.num_views == 3 and cached.features.shape[:2] == (len(images), 3)
    assert torch.equal(cached.features, torch.stack(fresh, dim=1))
    assert all(torch.equal(a, b) for a, b in zip(cached.patch_tokens, tokens, strict=True))
    cache.clear()
    again = cache.training_views(miniature_backbone, images, patch_tokens=True)
    assert torch.equal(again.features, cached.features)
    assert all(torch.equal(a, b) for a, b in zip(again.patch_tokens, tokens, strict=True))
    assert cache.encoded_views == 3 * len(images)


def test_one_view_is_the_eval_transform_and_more_are_seeded_crops(miniature_backbone, tmp_path):
    images = _images()
    cache = FeatureCache(_settings(tmp_path))
    plain = cache.training_views(miniature_backbone, images)
    assert plain.num_views == 1 and plain.patch_tokens is None
    assert torch.equal(plain.features[:, 0], cache.get(miniature_backbone, images)[0])
    augmented = cache.training_views(miniature_backbone, images, _settings(tmp_path, views=2))
    assert not torch.allclose(augmented.features[:, 0], plain.features[:, 0])
    assert not torch.allclose(augmented.features[:, 0], augmented.features[:, 1])
    reseeded = _settings(tmp_path, views=2, augmentation=AugmentationSettings(seed=1))
    other = cache.training_views(miniature_backbone, images, reseeded)
    assert not torch.allclose(other.features, augmented.features)


def test_a_view_is_the_same_crop_whatever_the_batch_or_view_count(miniature_backbone):
    transform = _augmented(miniature_backbone, FeatureSettings())
    image = _images(1).with_transform(None)[0][0]
    assert torch.equal(transform(image, "x/1", 2), transform(image, "x/1", 2))
    assert not torch.equal(transform(image, "x/1", 2), transform(image, "x/1", 3))
    assert not torch.equal(transform(image, "x/1", 2), transform(image, "x/2", 2))
    size = miniature_backbone.image_size
    assert transform(image, "x/1", 0).shape == (3, size, size)
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, height, width = transform.crop_box(52, 40, rng)
        assert top >= 0 and left >= 0 and top + height <= 40 and left + width <= 52


def test_changing_the_view_count_never_returns_the_old_views(miniature_backbone, tmp_path):
    images = _images()
    cache = FeatureCache(_settings(tmp_path))
    two = cache.training_views(miniature_backbone, images, _settings(tmp_path, views=2))
    three = cache.training_views(miniature_backbone, images, _settings(tmp_path, views=3))
    assert three.num_views == 3
    # Views are keyed by index: raising the count encodes only the new view.
    assert cache.encoded_views == 3 * len(images)
    torch.testing.assert_close(three.features[:, :2], two.features, rtol=0, atol=1e-6)
    one = cache.training_views(miniature_backbone, images, _settings(tmp_path, views=1))
    assert one.num_views == 1 and cache.encoded_views == 4 * len(images)
    assert not torch.allclose(one.features[:, 0], two.features[:, 0])


def test_changing_the_backbone_weights_or_spec_invalidates(
    miniature_backbone, miniature_native_backbone, tmp_path
):
    images = _images()
    cache = FeatureCache(_settings(tmp_path))
    base, _ = cache.get(miniature_backbone, images)
    model = copy.deepcopy(miniature_backbone.model)
    with torch.no_grad():
        model.visual.head.proj.weight.mul_(-1.0)
    retrained = dataclasses.replace(miniature_backbone, model=model)
    assert backbone_identity(retrained) != backbone_identity(miniature_backbone)
    flipped, _ = cache.get(retrained, images)
    torch.testing.assert_close(flipped, -base)
    native, _ = cache.get(miniature_native_backbone, images)
    assert native.shape[0] == len(images)
    assert cache.encoded_views == 3 * len(images)
    cache.clear()
    assert torch.equal(cache.get(miniature_backbone, images)[0], base)
    assert cache.encoded_views == 3 * len(images)


def test_changing_the_preprocessing_or_images_invalidates(miniature_backbone, tmp_path):
    images = _images()
    cache = FeatureCache(_settings(tmp_path))
    base, _ = cache.get(miniature_backbone, images)
    blurred = transforms.Compose([transforms.GaussianBlur(5), miniature_backbone.preprocess])
    assert repr(blurred) != repr(miniature_backbone.preprocess)
    other = dataclasses.replace(miniature_backbone, preprocess=blurred)
    changed, _ = cache.get(other, images)
    assert changed.shape == base.shape and not torch.allclose(changed, base)
    assert cache.encoded_views == 2 * len(images)
    renamed = _images(prefix="other")
    cache.get(miniature_backbone, renamed)
    cache.get(miniature_backbone, images.subset([0, 1, 2]))
    assert cache.encoded_views == 3 * len(images) + 3
    crop = _settings(tmp_path, views=2)
    wider = _settings(tmp_path, views=2, augmentation=AugmentationSettings(scale=(0.5, 1.0)))
    cache.training_views(miniature_backbone, images, crop)
    cache.training_views(miniature_backbone, images, wider)
    assert cache.encoded_views == 7 * len(images) + 3


def test_imagenet_normalization_reaches_every_view_and_is_cached_apart(
    miniature_backbone, tmp_path
):
    images = _images()
    cache = FeatureCache(_settings(tmp_path))
    own, _ = cache.get(miniature_backbone, images)
    imagenet, _ = cache.get(miniature_backbone, images, normalization="imagenet")
    assert not torch.allclose(own, imagenet) and cache.encoded_views == 2 * len(images)
    by_hand = transforms.Compose(
        [
            *miniature_backbone.preprocess.transforms[:-1],
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    expected = miniature_backbone.encode_images(
        torch.stack([by_hand(im) for im, _ in images.with_transform(None)])
    )
    torch.testing.assert_close(imagenet, expected.cpu(), rtol=1e-4, atol=1e-5)
    assert torch.equal(
        encode_image_set(miniature_backbone, images, normalization="imagenet")[0], imagenet
    )
    configured = FeatureCache(_settings(tmp_path, normalization="imagenet"))
    assert torch.equal(configured.get(miniature_backbone, images)[0], imagenet)  # from disk
    crops = configured.training_views(
        miniature_backbone, images, _settings(tmp_path, views=2, normalization="imagenet")
    )
    own_crops = configured.training_views(miniature_backbone, images, _settings(tmp_path, views=2))
    assert not torch.allclose(crops.features, own_crops.features)
    assert configured.encoded_views == 4 * len(images)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bit_flip", "stale", "empty"])
def test_a_damaged_cache_file_is_rebuilt(miniature_backbone, tmp_path, caplog, damage):
    images = _images()
    cache = FeatureCache(_settings(tmp_path))
    base, _ = cache.get(miniature_backbone, images)
    (path,) = tmp_path.rglob("*.features.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        payload = torch.load(path, weights_only=True)
        if damage == "bit_flip":
            payload["tensors"]["features"][0, 0] += 1.0
        else:
            payload["key"] = "0" * 64
        torch.save(payload, path)
    cache.clear()
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        rebuilt, _ = cache.get(miniature_backbone, images)
    assert str(path) in caplog.text and "rebuild" in caplog.text
    assert cache.encoded_views == 2 * len(images)
    assert torch.equal(rebuilt, base)
    cache.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert torch.equal(cache.get(miniature_backbone, images)[0], base)
    assert cache.encoded_views == 2 * len(images) and not caplog.text


def test_concurrent_writers_leave_one_valid_file(tmp_path):
    store = FeatureStore(tmp_path)
    tensors = {"features": torch.randn(64, 32)}
    threads = [
        threading.Thread(target=store.save, args=("b" * 64, "k" * 64, "features", tensors, {}))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = store.load("b" * 64, "k" * 64, "features")
    assert loaded is not None and torch.equal(loaded["features"], tensors["features"])
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{'k' * 40}.features.pt"]


def test_unwritable_cache_folder_only_costs_speed(miniature_backbone, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    cache = FeatureCache(_settings(blocker / "features"))
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        features, _ = cache.get(miniature_backbone, _images())
    assert features.shape[0] == 6 and "cannot be written" in caplog.text


def test_patch_tokens_are_half_precision_within_the_budget(miniature_backbone, tmp_path):
    images = _images()
    cache = FeatureCache(_settings(tmp_path, views=2))
    views = cache.training_views(miniature_backbone, images, patch_tokens=True)
    tokens = views.patch_tokens
    assert len(tokens) == 2 and all(t.dtype == torch.float16 for t in tokens)
    assert tokens[0].shape[0] == len(images) and tokens[0].shape[2] == miniature_backbone.embed_dim
    token_bytes = sum(t.numel() * t.element_size() for t in tokens)
    feature_bytes = views.features.numel() * views.features.element_size()
    assert cache.memory_bytes == token_bytes + feature_bytes
    # Over budget: not held in memory, read memory-mapped from the disk cache instead.
    small = _settings(tmp_path, views=2, patch_tokens_budget_mb=token_bytes / 4 / 2**20)
    mapped_cache = FeatureCache(small)
    mapped = mapped_cache.training_views(miniature_backbone, images, patch_tokens=True)
    assert all(torch.equal(a, b) for a, b in zip(mapped.patch_tokens, tokens, strict=True))
    assert mapped_cache.memory_bytes == feature_bytes and mapped_cache.encoded_views == 0
    with pytest.raises(MemoryError, match="patch_tokens_budget_mb"):
        FeatureCache(dataclasses.replace(small, cache_dir=None)).training_views(
            miniature_backbone, images, patch_tokens=True
        )


def test_patch_tokens_are_the_projected_tokens_of_the_tower(miniature_backbone):
    pixels = torch.randn(2, 3, miniature_backbone.image_size, miniature_backbone.image_size)
    pooled, patches = miniature_backbone.encode_image_tokens(pixels)
    assert torch.equal(pooled, miniature_backbone.encode_images(pixels))
    patch = miniature_backbone.model.visual.trunk.patch_embed.patch_size[0]
    assert patches.shape == (2, (miniature_backbone.image_size // patch) ** 2, 32)


def test_memory_is_bounded_in_bytes_whatever_the_number_of_sets(miniature_backbone, tmp_path):
    images = _images(12)
    one_set = 3 * miniature_backbone.embed_dim * 4
    cache = FeatureCache(_settings(tmp_path, memory_mb=2.5 * one_set / 2**20))
    for start in range(0, 12, 3):
        cache.get(miniature_backbone, images.subset(range(start, start + 3)))
        assert cache.memory_bytes <= 2.5 * one_set
    assert cache.memory_bytes == 2 * one_set


def test_settings_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))
    assert FeatureSettings.from_config(None).cache_dir == tmp_path / "features"
    assert FeatureSettings.from_config({"cache_dir": False}).cache_dir is None
    settings = FeatureSettings.from_config(
        {
            "cache_dir": str(tmp_path / "x"),
            "views": 4,
            "augmentation": {"scale": [0.5, 1], "seed": 3},
        }
    )
    assert settings.views == 4 and settings.augmentation == AugmentationSettings((0.5, 1.0), seed=3)
    with pytest.raises(ValueError, match=r"features\.views"):
        FeatureSettings.from_config({"views": 0})
    with pytest.raises(ValueError, match="scale"):
        FeatureSettings.from_config({"augmentation": {"scale": [0.9, 0.2]}})
    assert FeatureSettings.from_config({"normalization": "imagenet"}).normalization == "imagenet"
    with pytest.raises(ValueError, match=r"features\.normalization must be one of"):
        FeatureSettings.from_config({"normalization": "imagnet"})


def test_entry_keys_separate_every_part():
    base = entry_key("b", "p", 0, ["x", "y"], "f")
    assert (
        len(
            {
                base,
                entry_key("c", "p", 0, ["x", "y"], "f"),
                entry_key("b", "q", 0, ["x", "y"], "f"),
                entry_key("b", "p", 1, ["x", "y"], "f"),
                entry_key("b", "p", 0, ["y", "x"], "f"),
                entry_key("b", "p", 0, ["xy"], "f"),
                entry_key("b", "p", 0, ["x", "y"], "g"),
            }
        )
        == 7
    )


def _image_files(folder, count, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8)).save(path)
    return paths


def test_an_image_file_replaced_under_its_name_is_encoded_again(miniature_backbone, tmp_path):
    paths = _image_files(tmp_path / "images", 4, seed=0)
    images = ImageSet(paths, [0, 1, 0, 1], ["a", "b"], [f"x/{p.name}" for p in paths])
    untouched = images.subset([0, 1])
    cache = FeatureCache(_settings(tmp_path / "cache"))
    base, _ = cache.get(miniature_backbone, images)
    cache.get(miniature_backbone, untouched)
    assert cache.encoded_views == 6
    (new,) = _image_files(tmp_path / "new", 1, seed=1)
    old_mtime = paths[3].stat().st_mtime_ns
    os.replace(new, paths[3])
    # Some filesystems keep mtimes coarse; make sure the replacement is seen as newer.
    os.utime(paths[3], ns=(old_mtime + 10**9, old_mtime + 10**9))
    for clear in (False, True):  # memory, then disk
        if clear:
            cache.clear()
        cache.get(miniature_backbone, untouched)
        assert cache.encoded_views == 6
    cache.clear()
    rebuilt, _ = cache.get(miniature_backbone, images)
    assert cache.encoded_views == 10
    fresh, _ = encode_image_set(miniature_backbone, images, batch_size=64)
    assert torch.equal(rebuilt, fresh)
    assert not torch.allclose(rebuilt[3], base[3])
    torch.testing.assert_close(rebuilt[:3], base[:3])
    cache.clear()
    assert torch.equal(cache.get(miniature_backbone, images)[0], rebuilt)
    assert cache.encoded_views == 10


def test_in_memory_pixels_changed_under_the_same_identities_are_encoded_again(
    miniature_backbone, tmp_path
):
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 40, 52, 3), dtype=np.uint8)
    images = ImageSet(pixels, np.arange(6) % 2, ["a", "b"], [f"img/{i}" for i in range(6)])
    cache = FeatureCache(_settings(tmp_path))
    base, _ = cache.get(miniature_backbone, images)
    changed = ImageSet(255 - pixels, images.labels, images.classnames, images.identities)
    inverted, _ = cache.get(miniature_backbone, changed)
    assert cache.encoded_views == 2 * len(images) and not torch.allclose(inverted, base)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_features_run_in_bf16_and_match_the_cpu(miniature_backbone, tmp_path):
    gpu = dataclasses.replace(miniature_backbone, model=copy.deepcopy(miniature_backbone.model))
    gpu.model.to("cuda")
    gpu.device = torch.device("cuda")
    assert backbone_identity(gpu) != backbone_identity(miniature_backbone)
    images = _images()
    on_cpu, _ = FeatureCache(_settings(tmp_path)).get(miniature_backbone, images)
    on_gpu, _ = FeatureCache(_settings(tmp_path)).get(gpu, images)
    assert on_gpu.dtype == torch.float32 and on_gpu.device.type == "cpu"
    assert torch.nn.functional.cosine_similarity(on_cpu, on_gpu).min() > 0.98


def test_a_feature_computed_under_one_acquisition_profile_is_never_served_for_another(
    miniature_backbone, tmp_path
):
    images = _images()
    first, second = (draw_profile(0, site) for site in range(2))
    cache = FeatureCache(_settings(tmp_path))
    stored, _ = cache.get(miniature_backbone, images)
    site_a, _ = cache.get(miniature_backbone, images.with_acquisition(first))
    site_b, _ = cache.get(miniature_backbone, images.with_acquisition(second))
    assert cache.encoded_views == 3 * len(images)
    assert not torch.allclose(site_a, stored) and not torch.allclose(site_a, site_b)
    fresh, _ = encode_image_set(miniature_backbone, images.with_acquisition(first), batch_size=64)
    assert torch.equal(site_a, fresh)
    # Another process (a fresh cache over the same folder) gets each profile's own features.
    again = FeatureCache(_settings(tmp_path))
    assert torch.equal(again.get(miniature_backbone, images.with_acquisition(second))[0], site_b)
    assert torch.equal(again.get(miniature_backbone, images.with_acquisition(first))[0], site_a)
    assert torch.equal(again.get(miniature_backbone, images)[0], stored)
    assert again.encoded_views == 0


BACKBONE_ID, KEY = "b" * 64, "k" * 64


def _stored_payload(store, kind="features"):
    """A sound entry saved through the store, and its payload as read back from disk."""
    tensors = {"features": torch.arange(12.0).reshape(3, 4), "labels": torch.arange(3)}
    path = store.save(BACKBONE_ID, KEY, kind, tensors, {"note": "test"})
    return path, torch.load(path, weights_only=True)


def test_a_bit_flip_in_a_memory_mapped_file_is_caught_by_its_checksum(tmp_path, caplog):
    store = FeatureStore(tmp_path)
    path, payload = _stored_payload(store, kind="tokens")
    payload["tensors"]["features"][0, 0] += 1.0
    torch.save(payload, path)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "tokens", mmap=True) is None
    assert "corrupt (checksum of 'features'" in caplog.text and not path.exists()


CORRUPT_PAYLOADS = {
    "another format": (lambda p: p | {"format": 99}, "of another format"),
    "another kind": (lambda p: p | {"kind": "tokens"}, "stale"),
    "a missing checksum": (
        lambda p: p | {"checksums": {"features": p["checksums"]["features"]}},
        r"incomplete \(tensors and checksums differ\)",
    ),
    "a missing tensor": (
        lambda p: p | {"tensors": {"features": p["tensors"]["features"]}},
        r"incomplete \(tensors and checksums differ\)",
    ),
}


@pytest.mark.parametrize("fault", list(CORRUPT_PAYLOADS))
def test_a_file_of_another_format_kind_or_checksum_set_is_deleted(tmp_path, caplog, fault):
    damage, reason = CORRUPT_PAYLOADS[fault]
    store = FeatureStore(tmp_path)
    path, payload = _stored_payload(store)
    torch.save(damage(payload), path)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "features") is None
    assert re.search(reason, caplog.text), caplog.text
    assert not path.exists()


# Mutation-testing round (issue 16): the store's layout, checks, memory-mapped verification and
# failure paths, and what the backbone identity samples.


def _tower_backbone(spec="tower", device="cpu", **tensors):
    """A Backbone whose image tower is just ``tensors`` (all ``backbone_identity`` reads)."""
    visual = torch.nn.Module()
    for name, value in tensors.items():
        visual.register_buffer(name, value)
    model = torch.nn.Module()
    model.visual = visual
    return Backbone(
        spec=spec,
        model=model,
        tokenizer=None,
        preprocess=None,
        preprocess_train=None,
        text_kind="native",
        image_size=8,
        embed_dim=4,
        device=torch.device(device),
    )


def test_backbone_identity_sees_every_element_of_a_small_tensor():
    weights = torch.arange(200.0)
    base = backbone_identity(_tower_backbone(w=weights))
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert backbone_identity(_tower_backbone(w=weights.clone())) == base  # same weights, same id
    for index in (1, 199):
        changed = weights.clone()
        changed[index] += 1.0
        assert backbone_identity(_tower_backbone(w=changed)) != base


def test_backbone_identity_separates_spec_device_path_shape_and_dtype():
    weights = torch.arange(12.0)
    identities = {
        backbone_identity(_tower_backbone(w=weights)),
        backbone_identity(_tower_backbone(spec="other", w=weights)),
        backbone_identity(_tower_backbone(device="cuda", w=weights)),
        backbone_identity(_tower_backbone(device="meta", w=weights)),
        backbone_identity(_tower_backbone(w=weights.reshape(3, 4))),
        backbone_identity(_tower_backbone(w=weights.double())),
        backbone_identity(_tower_backbone(v=weights)),
    }
    assert len(identities) == 7


def test_backbone_identity_reads_bf16_weights():
    weights = torch.arange(12.0)
    bf16 = backbone_identity(_tower_backbone(w=weights.bfloat16()))
    assert bf16 != backbone_identity(_tower_backbone(w=weights))


def test_backbone_identity_is_computed_once_per_backbone(monkeypatch):
    backbone = _tower_backbone(w=torch.arange(12.0))
    first = backbone_identity(backbone)
    monkeypatch.setattr(
        backbone.model.visual, "state_dict", lambda: pytest.fail("weights read again")
    )
    assert backbone_identity(backbone) == first


def test_the_store_folder_is_absolute_and_expands_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert FeatureStore("~/cache").directory == tmp_path / "home" / "cache"
    assert FeatureStore("relative").directory == tmp_path / "relative"


def test_store_layout_is_backbone_folder_then_entry_file(tmp_path):
    backbone_id, key = "0123456789abcdef" * 4, "fedcba9876543210" * 4
    path = FeatureStore(tmp_path).path(backbone_id, key, "tokens")
    assert path == tmp_path / "0123456789abcdef" / f"{key[:40]}.tokens.pt"


def test_a_saved_entry_holds_its_key_kind_meta_and_checksums(tmp_path):
    store = FeatureStore(tmp_path / "new" / "cache")  # created on first write
    meta = {"spec": "x", "where": tmp_path, "images": 3}
    tensors = {"features": torch.arange(12.0).reshape(3, 4).t(), "labels": torch.arange(3)}
    path = store.save(BACKBONE_ID, KEY, "features", tensors, meta)
    assert path == store.path(BACKBONE_ID, KEY, "features")
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "key", "kind", "meta", "tensors", "checksums"}
    assert (payload["format"], payload["key"], payload["kind"]) == (1, KEY, "features")
    assert payload["meta"] == f'{{"images": 3, "spec": "x", "where": "{tmp_path}"}}'
    assert all(t.is_contiguous() for t in payload["tensors"].values())
    assert payload["checksums"] == {
        name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
        for name, t in tensors.items()
    }
    loaded = store.load(BACKBONE_ID, KEY, "features")
    assert set(loaded) == {"features", "labels"}
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert store.save(BACKBONE_ID, KEY, "features", tensors, meta) == path  # rewritten in place


def test_a_store_writes_a_hidden_temporary_file_beside_the_target(tmp_path, renames):
    path = FeatureStore(tmp_path).save(BACKBONE_ID, KEY, "features", {"x": torch.ones(2)}, {})
    ((src, dst),) = renames
    assert dst == path and src.parent == path.parent and src.name.startswith(f".{path.name}.")


def test_a_failed_store_write_logs_once_and_leaves_no_temporary_file(tmp_path, caplog):
    store = FeatureStore(tmp_path)
    target = store.path(BACKBONE_ID, KEY, "features")
    target.mkdir(parents=True)  # a folder where the file should go: the final rename fails
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.save(BACKBONE_ID, KEY, "features", {"x": torch.ones(2)}, {}) is None
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    (record,) = caplog.records
    assert re.fullmatch(
        rf"Feature cache {re.escape(str(target))} cannot be written \(.*Is a directory.*\); "
        r"going on without\.",
        record.getMessage(),
    )


def test_an_absent_entry_or_folder_loads_as_none_without_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert FeatureStore(tmp_path).load(BACKBONE_ID, KEY, "features") is None
        assert FeatureStore(blocker).load(BACKBONE_ID, KEY, "features") is None
    assert not caplog.records


def test_a_file_vanishing_during_the_read_is_a_miss(tmp_path, caplog, monkeypatch):
    store = FeatureStore(tmp_path)
    path, _ = _stored_payload(store)

    def vanished(*args, **kwargs):
        raise FileNotFoundError(str(path))

    monkeypatch.setattr(torch, "load", vanished)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "features") is None
    assert not caplog.records


class _Executed(Exception):
    pass


class _Payload:
    """An object whose unpickling would run code: a cache file must never be able to."""

    def __reduce__(self):
        return (_raise_executed, ())


def _raise_executed():
    raise _Executed


@pytest.mark.parametrize("forced_off", [False, True])
def test_a_file_that_would_run_code_is_refused_unread(tmp_path, caplog, monkeypatch, forced_off):
    if forced_off:  # torch's switch for loads that do not say weights_only themselves
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    store = FeatureStore(tmp_path)
    path, payload = _stored_payload(store)
    torch.save(payload | {"meta": _Payload()}, path)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "features") is None
    (record,) = caplog.records
    assert record.getMessage().startswith(
        f"Feature cache file {path} is unreadable (UnpicklingError: "
    )
    assert record.getMessage().endswith("; deleting it to rebuild it.")
    assert not path.exists()


BROKEN_PAYLOADS = {
    "not a dict": (lambda p: [p], "of another format"),
    "no format": (lambda p: {k: v for k, v in p.items() if k != "format"}, "of another format"),
    "another key": (lambda p: p | {"key": "0" * 64}, "stale (written for another key)"),
    "another kind": (lambda p: p | {"kind": "tokens"}, "stale (written for another key)"),
    "no tensors": (lambda p: p | {"tensors": {}, "checksums": {}}, "incomplete"),
    "tensors not a dict": (lambda p: p | {"tensors": [1]}, "incomplete"),
    "checksums not a dict": (lambda p: p | {"checksums": ["x"]}, "incomplete"),
    "no checksums": (lambda p: {k: v for k, v in p.items() if k != "checksums"}, "incomplete"),
    "extra checksum": (
        lambda p: p | {"checksums": p["checksums"] | {"other": "0"}},
        "incomplete (tensors and checksums differ)",
    ),
    "not a tensor": (
        lambda p: p | {"tensors": p["tensors"] | {"labels": [0, 1, 2]}},
        "corrupt (checksum of 'labels' does not match)",
    ),
    "swapped checksums": (
        lambda p: (
            p
            | {
                "checksums": {
                    "features": p["checksums"]["labels"],
                    "labels": p["checksums"]["features"],
                }
            }
        ),
        "corrupt (checksum of 'features' does not match)",
    ),
}


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("fault", list(BROKEN_PAYLOADS))
def test_a_broken_file_is_deleted_with_its_reason(tmp_path, caplog, fault, mmap):
    damage, reason = BROKEN_PAYLOADS[fault]
    store = FeatureStore(tmp_path)
    path, payload = _stored_payload(store)
    torch.save(damage(payload), path)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "features", mmap=mmap) is None
    (record,) = caplog.records
    assert record.getMessage() == (
        f"Feature cache file {path} is {reason}; deleting it to rebuild it."
    )
    assert not path.exists()


def _mapped_files():
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split()) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_memory_mapped_load_maps_the_file(tmp_path):
    store = FeatureStore(tmp_path)
    path, _ = _stored_payload(store, kind="tokens")
    read = store.load(BACKBONE_ID, KEY, "tokens")
    assert str(path) not in _mapped_files()
    mapped = store.load(BACKBONE_ID, KEY, "tokens", mmap=True)
    assert str(path) in _mapped_files()
    assert torch.equal(mapped["features"], read["features"])


def _count_digests(monkeypatch):
    from fedprompt.data import feature_cache

    calls = []
    real = feature_cache._tensor_digest

    def counting(tensor):
        calls.append(1)
        return real(tensor)

    monkeypatch.setattr(feature_cache, "_tensor_digest", counting)
    return calls


def test_a_memory_mapped_file_is_verified_once_per_version(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    _stored_payload(store, kind="tokens")
    calls = _count_digests(monkeypatch)
    assert store.load(BACKBONE_ID, KEY, "tokens", mmap=True) is not None
    assert len(calls) == 2  # both tensors checked the first time
    assert store.load(BACKBONE_ID, KEY, "tokens", mmap=True) is not None
    assert len(calls) == 2  # not again for the same file version
    assert store.load(BACKBONE_ID, KEY, "tokens") is not None
    assert len(calls) == 4  # a read into memory is always checked
    assert FeatureStore(tmp_path).load(BACKBONE_ID, KEY, "tokens", mmap=True) is not None
    assert len(calls) == 6  # another store (process) checks for itself


def _rewrite(path, payload, *, same_mtime):
    """Write ``payload`` over ``path`` as the store does, keeping or advancing its mtime."""
    stat = path.stat()
    _save_as_the_store(payload, path)
    ns = stat.st_mtime_ns if same_mtime else stat.st_mtime_ns + 10**9
    os.utime(path, ns=(ns, ns))


def _save_as_the_store(payload, path):
    with open(path, "wb") as file:  # through a handle: the archive's inner name is the same
        torch.save(payload, file)


@pytest.mark.parametrize("change", ["mtime", "size"])
def test_a_memory_mapped_file_changed_after_its_check_is_checked_again(tmp_path, caplog, change):
    store = FeatureStore(tmp_path)
    path, payload = _stored_payload(store, kind="tokens")
    size = path.stat().st_size
    assert store.load(BACKBONE_ID, KEY, "tokens", mmap=True) is not None
    flipped = copy.deepcopy(payload)
    flipped["tensors"]["features"][0, 0] += 1.0
    if change == "size":  # same modification time, different size
        flipped["meta"] += " " * 200  # records are padded: add enough to change the size
    _rewrite(path, flipped, same_mtime=change == "size")
    assert (path.stat().st_size == size) == (change == "mtime")
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "tokens", mmap=True) is None
    assert "corrupt (checksum of 'features'" in caplog.text and not path.exists()


def test_a_verified_mapping_does_not_vouch_for_another_file_or_a_read(tmp_path, caplog):
    store = FeatureStore(tmp_path)
    path, payload = _stored_payload(store, kind="tokens")
    other = store.path(BACKBONE_ID, "j" * 64, "tokens")
    flipped = copy.deepcopy(payload) | {"key": "j" * 64}
    flipped["tensors"]["features"][0, 0] += 1.0
    _save_as_the_store(flipped, other)
    stat = path.stat()
    os.utime(other, ns=(stat.st_mtime_ns, stat.st_mtime_ns))
    assert other.stat().st_size == stat.st_size  # same size and time, another file
    assert store.load(BACKBONE_ID, KEY, "tokens", mmap=True) is not None
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, "j" * 64, "tokens", mmap=True) is None
    assert "corrupt" in caplog.text
    # The same file changed without a new size or time: a read into memory still checks it.
    caplog.clear()
    bad = copy.deepcopy(payload)
    bad["tensors"]["features"][0, 0] += 1.0
    _rewrite(path, bad, same_mtime=True)
    assert path.stat().st_size == stat.st_size
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "tokens") is None
    assert "corrupt" in caplog.text


def test_a_broken_file_another_process_already_deleted_is_a_miss(tmp_path, caplog, monkeypatch):
    store = FeatureStore(tmp_path)
    path, _ = _stored_payload(store)

    def broken_and_gone(*args, **kwargs):
        path.unlink()  # another process found it broken first and deleted it
        raise RuntimeError("truncated")

    monkeypatch.setattr(torch, "load", broken_and_gone)
    with caplog.at_level(logging.WARNING, logger="fedprompt.data.feature_cache"):
        assert store.load(BACKBONE_ID, KEY, "features") is None
    assert "unreadable (RuntimeError: truncated)" in caplog.text
