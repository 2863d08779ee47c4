"""Simulated scanners: seeded per site, different between sites, deterministic per image."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from fedprompt.data.acquisition import (
    BITS,
    BLUR_SIGMA,
    CONTRAST,
    GAMMA,
    NOISE_STD,
    SCALE,
    AcquisitionProfile,
    draw_profile,
    site_profiles,
)
from fedprompt.data.image_set import DataError


def _image(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8), "RGB")


def test_profiles_are_deterministic_for_a_seed_and_differ_between_sites_and_seeds():
    first = site_profiles("scanner", seed=3, num_sites=6)
    assert first == site_profiles("scanner", seed=3, num_sites=6)
    assert len({p.key for p in first}) == 6
    other_seed = site_profiles("scanner", seed=4, num_sites=6)
    assert all(a != b for a, b in zip(first, other_seed, strict=True))
    # A site's profile does not depend on how many sites there are.
    assert site_profiles("scanner", seed=3, num_sites=2) == first[:2]


def test_profiles_stay_within_the_documented_ranges():
    for profile in site_profiles("scanner", seed=0, num_sites=50):
        assert CONTRAST[0] <= profile.contrast <= CONTRAST[1]
        assert GAMMA[0] <= profile.gamma <= GAMMA[1]
        assert BLUR_SIGMA[0] <= profile.blur <= BLUR_SIGMA[1]
        assert NOISE_STD[0] <= profile.noise <= NOISE_STD[1]
        assert SCALE[0] <= profile.scale <= SCALE[1]
        assert BITS[0] <= profile.bits <= BITS[1]


def test_none_gives_no_profiles_and_an_unknown_kind_is_one_sentence():
    assert site_profiles("none", seed=0, num_sites=3) is None
    with pytest.raises(DataError, match=r"partition.acquisition=mri is not known; use one of"):
        site_profiles("mri", seed=0, num_sites=3)
    with pytest.raises(DataError, match="seed=-1"):
        draw_profile(-1, 0)


def test_a_profile_changes_the_pixels_and_keeps_the_size():
    image = _image()
    for profile in site_profiles("scanner", seed=0, num_sites=3):
        seen = profile(image, "img/0")
        assert seen.size == image.size and seen.mode == "RGB"
        assert not np.array_equal(np.asarray(seen), np.asarray(image))


def test_an_images_noise_is_seeded_by_its_identity_not_the_read_order():
    profile = draw_profile(0, 1)
    image = _image()
    once = np.asarray(profile(image, "img/0"))
    assert np.array_equal(once, np.asarray(profile(_image(), "img/0")))
    assert not np.array_equal(once, np.asarray(profile(image, "img/1")))
    quiet = dataclasses.replace(profile, noise=0.0)
    assert np.array_equal(np.asarray(quiet(image, "img/0")), np.asarray(quiet(image, "img/1")))


def test_noise_is_the_same_in_every_channel_so_grey_images_stay_grey():
    grey = Image.fromarray(np.full((32, 32), 120, dtype=np.uint8)).convert("RGB")
    seen = np.asarray(AcquisitionProfile(1.0, 1.0, 0.0, 0.04, 1.0, 8)(grey, "grey"))
    assert seen[..., 0].std() > 0
    assert np.array_equal(seen[..., 0], seen[..., 1]) and np.array_equal(seen[..., 1], seen[..., 2])


def test_each_parameter_acts_alone_and_the_neutral_profile_changes_nothing():
    image = _image()
    neutral = AcquisitionProfile(1.0, 1.0, 0.0, 0.0, 1.0, 8)
    assert np.array_equal(np.asarray(neutral(image, "x")), np.asarray(image))
    for change in [
        {"contrast": 0.8},
        {"gamma": 1.3},
        {"blur": 1.0},
        {"noise": 0.03},
        {"scale": 0.5},
        {"bits": 5},
    ]:
        seen = dataclasses.replace(neutral, **change)(image, "x")
        assert not np.array_equal(np.asarray(seen), np.asarray(image)), change
    levels = np.unique(np.asarray(dataclasses.replace(neutral, bits=3)(image, "x")))
    assert len(levels) <= 8


def test_the_key_names_every_parameter_and_the_record_carries_it():
    profile = draw_profile(0, 0)
    record = profile.record()
    assert record["key"] == profile.key
    for field in dataclasses.fields(AcquisitionProfile):
        assert f"{field.name}=" in profile.key
        assert record[field.name] == getattr(profile, field.name)
