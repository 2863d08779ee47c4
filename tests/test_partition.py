"""Partitioners, per-site test sets and the partitions report."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from fedprompt.data import (
    DataError,
    SitePartition,
    assign_sites,
    dirichlet_partition,
    few_shot_indices,
    iid_partition,
    partition_labels,
    partitions_report,
    pathological_partition,
    read_partitions_json,
    write_partitions_json,
)

SPLITS = Path(__file__).parents[1] / "../shared/data/biomedcoop-splits"
RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 6, size=600)
TEST_LABELS = RNG.integers(0, 6, size=300)

# mutmut runs the suite through trampolines that add stack frames, which moves where a warning's
# stacklevel points; the warning-location checks run in the normal suite only.
UNDER_MUTMUT = "MUTANT_UNDER_TEST" in os.environ

SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3}),
    ("dirichlet", {"alpha": 5.0, "min_size": 10}),
    ("pathological", {"classes_per_site": 2}),
]


def _check_disjoint_complete(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n
    assert all(np.all(np.diff(p) > 0) for p in parts if len(p) > 1)


def _skew(parts, labels, num_classes):
    """Mean total-variation distance between each site's label distribution and the global one."""
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    dists = [np.bincount(labels[p], minlength=num_classes) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(d - overall).sum() for d in dists]))


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=lambda v: str(v))
@pytest.mark.parametrize("num_sites", [1, 3, 5])
def test_disjoint_complete_deterministic(scheme, kwargs, num_sites):
    if scheme == "pathological":
        kwargs = {"classes_per_site": -(-6 // num_sites)}
    parts = partition_labels(LABELS, num_sites, scheme, seed=4, **kwargs)
    assert len(parts) == num_sites
    _check_disjoint_complete(parts, len(LABELS))
    again = partition_labels(LABELS, num_sites, scheme, seed=4, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if num_sites > 1:
        other = partition_labels(LABELS, num_sites, scheme, seed=5, **kwargs)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in iid_partition(np.arange(23) % 3, 5, 0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 23


def test_dirichlet_honours_min_size():
    labels = np.repeat(np.arange(4), 10)
    for seed in range(5):
        parts = dirichlet_partition(labels, 8, seed, alpha=0.1, min_size=3)
        assert min(len(p) for p in parts) >= 3
        _check_disjoint_complete(parts, 40)


def test_dirichlet_skew_grows_as_alpha_falls():
    labels = np.repeat(np.arange(5), 200)
    skews = [
        np.mean([_skew(dirichlet_partition(labels, 5, s, alpha=a), labels, 5) for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.4


def test_dirichlet_impossible_requests():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(DataError, match="at least 5 images"):
        dirichlet_partition(labels, 5, 0, alpha=1.0, min_size=5)
    with pytest.raises(DataError, match="tries"):
        dirichlet_partition(labels, 10, 0, alpha=0.001, min_size=2)
    with pytest.raises(DataError, match="positive"):
        dirichlet_partition(labels, 2, 0, alpha=0.0)


@pytest.mark.filterwarnings("ignore:.*left out")
@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_each_site_k_classes_and_uses_all(k):
    parts = pathological_partition(LABELS, 5, 1, classes_per_site=k)
    held = [set(np.unique(LABELS[p]).tolist()) for p in parts]
    assert all(len(h) == k for h in held)
    if 5 * k >= 6:
        assert set().union(*held) == set(range(6))
        _check_disjoint_complete(parts, len(LABELS))
    for c in range(6):
        holders = [p for p in parts if c in set(LABELS[p])]
        shares = [int(np.sum(LABELS[p] == c)) for p in holders]
        if shares:
            assert max(shares) - min(shares) <= 1


def test_pathological_leaves_out_unheld_classes_with_a_warning():
    with pytest.warns(UserWarning, match="left out"):
        parts = pathological_partition(LABELS, 2, 0, classes_per_site=2)
    joined = np.concatenate(parts)
    assert len(np.unique(LABELS[joined])) == 4
    assert len(joined) == len(np.unique(joined))


def test_pathological_impossible_requests():
    with pytest.raises(DataError, match=r"classes_per_site must lie in 1\.\.6"):
        pathological_partition(LABELS, 3, 0, classes_per_site=7)
    with pytest.raises(DataError, match=r"some\s+would get none"):
        pathological_partition(np.repeat(np.arange(4), 1), 4, 0, classes_per_site=2)


def test_more_sites_than_images_and_bad_arguments():
    with pytest.raises(DataError, match="3 images"):
        iid_partition([0, 1, 0], 4, 0)
    with pytest.raises(DataError, match="at least 1"):
        iid_partition([0, 1, 0], 0, 0)
    with pytest.raises(DataError, match="seed"):
        iid_partition([0, 1, 0], 2, -1)


def test_partition_labels_options():
    with pytest.raises(DataError, match="Unknown partition scheme 'shards'"):
        partition_labels(LABELS, 3, "shards", 0)
    with pytest.raises(DataError, match="needs `alpha`"):
        partition_labels(LABELS, 3, "dirichlet", 0)
    with pytest.raises(DataError, match="needs `classes_per_site`"):
        partition_labels(LABELS, 3, "pathological", 0)
    with pytest.raises(DataError, match=r"not \['alhpa'\]"):
        partition_labels(LABELS, 3, "dirichlet", 0, alhpa=0.5, alpha=0.5)
    parts = partition_labels(LABELS, 3, "iid", 0, alpha=None, classes_per_site=None)
    assert all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(LABELS, 3, 0), strict=True)
    )


def _proportions(labels, num_classes):
    return np.bincount(labels, minlength=num_classes) / max(len(labels), 1)


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES, ids=lambda v: str(v))
def test_assign_sites_test_sets_follow_train_proportions(scheme, kwargs):
    plan = assign_sites(LABELS, TEST_LABELS, 4, scheme, seed=2, **kwargs)
    assert plan.site_names == ["site-0", "site-1", "site-2", "site-3"]
    _check_disjoint_complete(plan.train, len(LABELS))
    joined = np.concatenate(plan.test)
    assert len(joined) == len(np.unique(joined)) and joined.max() < len(TEST_LABELS)
    for train, test in zip(plan.train, plan.test, strict=True):
        assert len(test) > 0
        gap = np.abs(_proportions(LABELS[train], 6) - _proportions(TEST_LABELS[test], 6))
        assert gap.max() < 0.05
        ratio = len(test) / len(train)
        assert abs(ratio - len(joined) / len(LABELS)) < 0.05
    again = assign_sites(LABELS, TEST_LABELS, 4, scheme, seed=2, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(plan.test, again.test, strict=True))


def test_assign_sites_with_balanced_few_shot_train_and_skewed_test():
    train = np.repeat(np.arange(3), 16)
    test = np.repeat(np.arange(3), [400, 100, 40])
    plan = assign_sites(train, test, 3, "dirichlet", seed=0, alpha=1.0, min_size=2)
    for tr, te in zip(plan.train, plan.test, strict=True):
        expected = np.bincount(train[tr], minlength=3) * 40 / 16
        assert np.abs(np.bincount(test[te], minlength=3) - expected).max() <= 1
    assert sum(len(t) for t in plan.test) == 120


def test_class_without_test_images_warns():
    train = np.array([0, 0, 1, 1, 2, 2])
    test = np.array([0, 1, 0, 1])
    with pytest.warns(UserWarning, match=r"Classes \[2\]"):
        plan = assign_sites(train, test, 2, "iid", seed=0)
    assert sum(len(t) for t in plan.test) == 4


def test_a_site_without_test_images_is_named_in_a_warning():
    with pytest.warns(UserWarning) as caught:
        plan = assign_sites(np.arange(8) % 2, [0, 1], 4, "iid", seed=0)
    empty = [name for name, test in zip(plan.site_names, plan.test, strict=True) if not len(test)]
    assert len(empty) == 2 and len(caught) == 2
    for name, warning in zip(empty, caught, strict=True):
        text = str(warning.message)
        assert text.startswith(f"Site {name} gets no test images")
        assert "fewer sites" in text and "larger test split" in text


@pytest.mark.skipif(not SPLITS.is_dir(), reason="../shared/data/biomedcoop-splits is absent")
def test_assign_sites_on_the_real_btmri_split():
    raw = json.loads((SPLITS / "split_BTMRI.json").read_text())
    train = np.array([label for _, label, _ in raw["train"]])
    test = np.array([label for _, label, _ in raw["test"]])
    plan = assign_sites(train, test, 5, "dirichlet", seed=1, alpha=0.5)
    used = sum(len(t) for t in plan.test)
    assert used > 0.8 * len(test)
    for tr, te in zip(plan.train, plan.test, strict=True):
        gap = np.abs(_proportions(train[tr], 4) - _proportions(test[te], 4))
        assert gap.max() < 0.02
    shots = few_shot_indices(train, 16, 1)
    small = assign_sites(train[shots], test, 5, "iid", seed=1)
    assert sum(len(t) for t in small.test) > 0.8 * len(test)


def test_report_round_trips_through_json(tmp_path):
    names = [f"class {i}" for i in range(6)]
    params = {"num_sites": 3, "seed": np.int64(7), "alpha": np.float64(0.5), "min_size": 2}
    plan = assign_sites(LABELS, TEST_LABELS, 3, "dirichlet", seed=7, alpha=0.5)
    report = partitions_report(plan, LABELS, TEST_LABELS, names, "dirichlet", params)
    path = tmp_path / "out" / "partitions.json"
    write_partitions_json(path, report)
    back = read_partitions_json(path)
    assert back == json.loads(json.dumps(report))
    assert back["scheme"] == "dirichlet" and back["seed"] == 7
    assert back["params"] == {"num_sites": 3, "seed": 7, "alpha": 0.5, "min_size": 2}
    for site, tr, te in zip(back["sites"], plan.train, plan.test, strict=True):
        assert site["train_indices"] == tr.tolist() and site["test_indices"] == te.tolist()
        assert sum(site["train_histogram"].values()) == site["train_size"] == len(tr)
        assert sum(site["test_histogram"].values()) == site["test_size"] == len(te)
        assert list(site["train_histogram"]) == names
    rebuilt = SitePartition.from_report(back)
    assert rebuilt.site_names == plan.site_names
    assert all(np.array_equal(a, b) for a, b in zip(rebuilt.train, plan.train, strict=True))
    assert [p.name for p in path.parent.iterdir()] == ["partitions.json"]


def test_a_negative_min_size_is_refused():
    with pytest.raises(DataError, match="at least -1 images"):
        dirichlet_partition(LABELS, 3, 0, alpha=1.0, min_size=-1)


def test_no_class_with_both_train_and_test_images_leaves_every_test_set_empty():
    with pytest.warns(UserWarning) as caught:
        plan = assign_sites([0, 0, 1, 1], [2, 2, 3], 2, "iid", seed=0)
    assert [len(t) for t in plan.test] == [0, 0]
    messages = [str(warning.message) for warning in caught]
    assert messages[0].startswith("Classes [0, 1] have train images but no test images")
    assert [text.split(" gets")[0] for text in messages[1:]] == ["Site site-0", "Site site-1"]
    assert sorted(np.concatenate(plan.train).tolist()) == [0, 1, 2, 3]


def test_a_failed_partitions_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "partitions.json"
    target.mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(OSError):
        write_partitions_json(target, {"scheme": "iid"})
    assert [p.name for p in tmp_path.iterdir()] == ["partitions.json"]


# Mutation-testing round (issue 16): boundaries, whole refusal sentences, the written record.


def test_the_site_count_and_seed_boundaries_are_allowed():
    assert [len(p) for p in iid_partition([0, 1, 0], 3, 0)] == [1, 1, 1]  # one image per site
    assert [len(p) for p in iid_partition([0, 1, 0], 1, 0)] == [3]


@pytest.mark.parametrize(
    ("num_sites", "seed", "sentence"),
    [
        (2, -1, "The partition seed must be >= 0, got -1."),
        (0, 0, "num_sites must be at least 1, got 0."),
        (
            4,
            0,
            "Cannot give 4 sites at least one image each from 3 images; use fewer sites or "
            "more shots.",
        ),
    ],
)
def test_impossible_site_requests_are_refused_in_one_sentence(num_sites, seed, sentence):
    with pytest.raises(DataError) as err:
        iid_partition([0, 1, 0], num_sites, seed)
    assert str(err.value) == sentence


def test_dirichlet_min_size_boundaries():
    # min_size 0 asks for nothing; min_size * num_sites == the image count is still possible.
    assert len(dirichlet_partition([0, 1, 2, 0, 1, 2], 3, 0, alpha=1.0, min_size=0)) == 3
    parts = dirichlet_partition([0, 0, 1, 1], 2, 0, alpha=100.0, min_size=2)
    assert [len(p) for p in parts] == [2, 2]
    _check_disjoint_complete(parts, 4)


def test_dirichlet_default_min_size_is_two():
    # 5 images over 2 sites: min_size 2 is possible, 3 would not be.
    parts = dirichlet_partition([0, 0, 1, 1, 1], 2, 0, alpha=1.0)
    assert min(len(p) for p in parts) >= 2
    via_options = partition_labels([0, 0, 1, 1, 1], 2, "dirichlet", 0, alpha=1.0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, via_options, strict=True))


def test_dirichlet_refusals_are_one_sentence():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(DataError) as err:
        dirichlet_partition(labels, 5, 0, alpha=1.0, min_size=5)
    assert str(err.value) == (
        "Cannot give each of 5 sites at least 5 images from 20 images; lower min_size or num_sites."
    )
    with pytest.raises(DataError) as err:
        dirichlet_partition(labels, 10, 0, alpha=0.001, min_size=2)
    assert str(err.value) == (
        "No Dirichlet(alpha=0.001) draw gave all 10 sites at least 2 images in 1000 tries "
        "(20 images); raise alpha, lower min_size or use fewer sites."
    )
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(DataError) as err:
            dirichlet_partition(labels, 2, 0, alpha=alpha)
        assert str(err.value) == f"Dirichlet alpha must be positive, got {alpha}."


def test_dirichlet_accepts_a_small_positive_alpha():
    parts = dirichlet_partition(np.repeat(np.arange(2), 10), 2, 0, alpha=0.5)
    _check_disjoint_complete(parts, 20)


def test_pathological_boundaries():
    labels = np.repeat(np.arange(3), 3)
    # Every site holds every class (classes_per_site == the class count), and each class has
    # exactly as many images as the sites holding it: one each.
    parts = pathological_partition(labels, 3, 0, classes_per_site=3)
    assert [sorted(labels[p].tolist()) for p in parts] == [[0, 1, 2]] * 3
    one = pathological_partition(labels, 3, 0, classes_per_site=1)
    assert sorted(len(set(labels[p].tolist())) for p in one) == [1, 1, 1]
    _check_disjoint_complete(one, 9)


@pytest.mark.parametrize("classes_per_site", [0, 4])
def test_pathological_refuses_classes_per_site_outside_the_classes_present(classes_per_site):
    with pytest.raises(DataError) as err:
        pathological_partition(np.repeat(np.arange(3), 3), 3, 0, classes_per_site=classes_per_site)
    assert str(err.value) == (
        f"classes_per_site must lie in 1..3 (the classes present), got {classes_per_site}."
    )


def test_pathological_refusal_and_warning_sentences():
    with pytest.raises(DataError) as err:
        pathological_partition(np.repeat(np.arange(3), 2), 3, 0, classes_per_site=3)
    assert str(err.value) == (
        "Class 0 has 2 images but 3 sites hold it, so some would get none of it; use fewer "
        "sites, fewer classes_per_site or more shots."
    )
    with pytest.warns(UserWarning) as caught:
        pathological_partition(np.repeat(np.arange(3), 2), 1, 0, classes_per_site=2)
    (warning,) = caught
    assert re.fullmatch(
        r"1 sites x 2 classes cannot cover 3 classes; the images of classes \[\d\] are left out\.",
        str(warning.message),
    )
    assert UNDER_MUTMUT or warning.filename == __file__  # the warning points at the caller


def test_partition_labels_refusals_are_one_sentence():
    cases = [
        (
            "shards",
            {},
            "Unknown partition scheme 'shards'; use one of ['iid', 'dirichlet', 'pathological'].",
        ),
        ("dirichlet", {}, "The dirichlet partition scheme needs `alpha` (e.g. 0.5)."),
        (
            "pathological",
            {},
            "The pathological partition scheme needs `classes_per_site` (e.g. 2).",
        ),
        (
            "iid",
            {"alpha": 0.5},
            "Partition scheme 'iid' takes the options [], not ['alpha']; "
            "remove them or set them to null.",
        ),
        (
            "dirichlet",
            {"alpha": 1.0, "classes_per_site": 2, "seeds": 1},
            "Partition scheme 'dirichlet' takes the options ['alpha', 'min_size'], not "
            "['classes_per_site', 'seeds']; remove them or set them to null.",
        ),
        (
            "pathological",
            {"classes_per_site": 2, "alpha": 1.0},
            "Partition scheme 'pathological' takes the options ['classes_per_site'], not "
            "['alpha']; remove them or set them to null.",
        ),
    ]
    for scheme, options, sentence in cases:
        with pytest.raises(DataError) as err:
            partition_labels(LABELS, 3, scheme, 0, **options)
        assert str(err.value) == sentence


def test_partition_labels_passes_each_scheme_its_options():
    labels = np.repeat(np.arange(3), 4)
    for options in ({"alpha": 0.5, "min_size": 3}, {"alpha": "2", "min_size": "1"}):
        expected = dirichlet_partition(
            labels, 3, 1, alpha=float(options["alpha"]), min_size=int(options["min_size"])
        )
        got = partition_labels(labels, 3, "dirichlet", 1, classes_per_site=None, **options)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    expected = pathological_partition(labels, 3, 1, classes_per_site=2)
    got = partition_labels(labels, 3, "pathological", 1, classes_per_site="2", alpha=None)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(DataError, match="at least 5 images"):  # min_size reaches the partitioner
        partition_labels(labels, 3, "dirichlet", 1, alpha=1.0, min_size=5)


def test_test_sets_take_each_class_in_train_proportions_exactly():
    # Site train shards hold class 0 in a 3:1 ratio; 8 test images of class 0 and 4 of class 1.
    train = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    test = np.array([0] * 8 + [1] * 4)
    plan = assign_sites(train, test, 2, "pathological", seed=0, classes_per_site=1)
    counts = sorted(np.bincount(test[t], minlength=2).tolist() for t in plan.test)
    assert counts == [[0, 4], [4, 0]]  # lam = min(8/4, 4/4) = 1


def test_largest_remainder_gives_the_leftover_to_the_largest_fractions_first():
    from fedprompt.data.partition import _largest_remainder

    got = _largest_remainder(np.array([0.5, 1.9, 0.4, 0.7]), 3)
    assert got.tolist() == [0, 2, 0, 1]
    # Ties go to the earlier site, whatever the number of sites.
    ties = _largest_remainder(np.full(40, 0.5), 17)
    assert ties.tolist() == [1] * 17 + [0] * 23
    assert _largest_remainder(np.array([1.0, 2.0]), 3).tolist() == [1, 2]
    assert _largest_remainder(np.array([0.5, 0.5]), 1).tolist() == [1, 0]
    assert _largest_remainder(np.array([1.2, 0.9]), 2).tolist() == [1, 1]  # by fraction, not size
    # Ties among many sites (where an unstable sort reorders them) still go to the earlier ones.
    fractions = np.array([1, 1, 2, 0, 2, 2, 0, 1, 2, 1, 0, 2, 2, 2, 0, 0, 2, 0, 1, 0]) / 4
    got = _largest_remainder(fractions + 1, 20 + 5)
    assert np.flatnonzero(got == 2).tolist() == [2, 4, 5, 8, 11]


def test_empty_test_sets_are_integer_index_arrays():
    with pytest.warns(UserWarning):
        plan = assign_sites([0, 0, 1, 1], [2, 2, 3], 2, "iid", seed=0)
    assert all(t.dtype == np.int64 for t in plan.test)
    with pytest.warns(UserWarning):
        sparse = assign_sites(np.arange(8) % 2, [0, 1], 4, "iid", seed=0)
    assert all(t.dtype == np.int64 for t in sparse.test)
    with pytest.warns(UserWarning, match="no test images"):  # the classes, not the sites
        no_test = assign_sites([0, 1, 0, 1], [], 2, "iid", seed=0)
    assert [t.tolist() for t in no_test.test] == [[], []]
    assert all(t.dtype == np.int64 for t in no_test.test)


def test_assign_sites_warnings_point_at_the_caller():
    with pytest.warns(UserWarning) as caught:
        assign_sites([0, 0, 1, 1], [2, 2, 3], 2, "iid", seed=0)
    assert len(caught) == 3
    assert UNDER_MUTMUT or all(w.filename == __file__ for w in caught)  # at the caller
    assert str(caught[0].message) == (
        "Classes [0, 1] have train images but no test images; sites' test sets leave them out."
    )
    assert str(caught[1].message) == (
        "Site site-0 gets no test images (3 test images for 2 sites under the iid partition), "
        "so it will train but not be evaluated; use fewer sites, another partition or a larger "
        "test split."
    )


def test_a_site_with_test_images_is_not_warned_about(recwarn):
    plan = assign_sites([0, 0, 1, 1], [0, 1, 0, 1], 2, "iid", seed=0)
    assert [len(t) for t in plan.test] == [2, 2] and not recwarn.list
    # A class with test images but no train images, or absent from both, is no one's concern.
    plan = assign_sites([0, 0, 2, 2], [0, 1, 2, 1, 0, 2], 2, "iid", seed=0)
    assert sum(len(t) for t in plan.test) == 4 and not recwarn.list
    plan = assign_sites([0, 0, 2, 2], [0, 2, 0, 2], 2, "iid", seed=0)  # class 1 in neither split
    assert sum(len(t) for t in plan.test) == 4 and not recwarn.list


def test_a_class_with_one_train_or_test_image_is_used_and_warned_about():
    plan = assign_sites([0, 0, 1], [0, 0, 1], 1, "iid", seed=0)
    assert [t.tolist() for t in plan.test] == [[0, 1, 2]]
    with pytest.warns(UserWarning) as caught:
        assign_sites([0, 0, 1], [0, 0], 1, "iid", seed=0)
    assert [str(w.message).split(" have")[0] for w in caught] == ["Classes [1]"]


def test_a_seed_gives_the_same_partition_in_every_version():
    # Published runs name their seed: its partition (train shards and test sets) is pinned.
    # Pathological: sites take classes in turn from the seeded order, here [3, 1, 2, 0].
    plan = assign_sites(
        [0, 0, 1, 1, 2, 2, 3, 3],
        [0, 1, 2, 3, 0, 1, 2, 3, 3],
        2,
        "pathological",
        seed=5,
        classes_per_site=2,
    )
    assert [t.tolist() for t in plan.train] == [[2, 3, 6, 7], [0, 1, 4, 5]]
    assert [t.tolist() for t in plan.test] == [[1, 3, 5, 8], [0, 2, 4, 6]]
    iid = assign_sites(np.arange(6) % 2, np.arange(10) % 2, 2, "iid", seed=3)
    assert [t.tolist() for t in iid.train] == [[2, 4, 5], [0, 1, 3]]
    assert [t.tolist() for t in iid.test] == [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]]


def test_a_partition_whose_lists_disagree_is_refused():
    plan = SitePartition(["site-0", "site-1"], [np.array([0]), np.array([1])], [np.array([0])])
    with pytest.raises(ValueError):
        partitions_report(plan, [0, 1], [0], ["a", "b"], "iid", {})


def test_the_report_is_the_whole_record():
    plan = SitePartition(
        site_names=["site-0", "site-1"],
        train=[np.array([0, 2]), np.array([1, 3, 4])],
        test=[np.array([1]), np.array([], dtype=np.int64)],
    )
    params = {"num_sites": 2, "seed": np.int64(3), "weights": np.array([0.5, 0.5])}
    report = partitions_report(plan, [0, 1, 0, 1, 1], [1, 0], ["a", "b"], "iid", params)
    assert report == {
        "scheme": "iid",
        "params": {"num_sites": 2, "seed": 3, "weights": [0.5, 0.5]},
        "seed": 3,
        "num_sites": 2,
        "classnames": ["a", "b"],
        "train_total": 5,
        "test_total": 2,
        "train_histogram": {"a": 2, "b": 3},
        "test_histogram": {"a": 1, "b": 1},
        "sites": [
            {
                "name": "site-0",
                "train_size": 2,
                "test_size": 1,
                "train_histogram": {"a": 2, "b": 0},
                "test_histogram": {"a": 1, "b": 0},
                "train_indices": [0, 2],
                "test_indices": [1],
            },
            {
                "name": "site-1",
                "train_size": 3,
                "test_size": 0,
                "train_histogram": {"a": 0, "b": 3},
                "test_histogram": {"a": 0, "b": 0},
                "train_indices": [1, 3, 4],
                "test_indices": [],
            },
        ],
    }
    assert partitions_report(plan, [0, 1, 0, 1, 1], [1, 0], ["a", "b"], "iid", {})["seed"] is None
    with pytest.raises(TypeError, match=r"^object is not JSON-serialisable$"):
        partitions_report(plan, [0, 1, 0, 1, 1], [1, 0], ["a", "b"], "iid", {"x": object()})
    rebuilt = SitePartition.from_report(report)
    assert rebuilt.site_names == ["site-0", "site-1"]
    assert [t.tolist() for t in rebuilt.test] == [[1], []]
    assert all(t.dtype == np.int64 for t in rebuilt.train + rebuilt.test)  # usable as indices
    # A dirichlet partition with min_size 0 may leave a site without train images.
    empty = SitePartition.from_report(
        {"sites": [{"name": "site-0", "train_indices": [], "test_indices": []}]}
    )
    assert empty.train[0].dtype == empty.test[0].dtype == np.int64


def test_partitions_json_is_indented_and_rewritable(tmp_path):
    path = tmp_path / "a" / "b" / "partitions.json"
    report = {"scheme": "iid", "seed": np.int64(1), "params": {"w": np.array([1, 2])}}
    write_partitions_json(path, report)
    write_partitions_json(path, report | {"scheme": "dirichlet"})  # an existing file is replaced
    text = path.read_text(encoding="utf-8")
    assert text == (
        '{\n "scheme": "dirichlet",\n "seed": 1,\n "params": {\n  "w": [\n   1,\n   2\n  ]\n }\n}\n'
    )
    assert read_partitions_json(path) == {"scheme": "dirichlet", "seed": 1, "params": {"w": [1, 2]}}
    assert [p.name for p in path.parent.iterdir()] == ["partitions.json"]


def test_partitions_json_is_written_beside_the_target_then_renamed(tmp_path, renames):
    path = tmp_path / "partitions.json"
    write_partitions_json(path, {"scheme": "iid"})
    ((src, dst),) = renames
    assert dst == path and src.parent == tmp_path and src.name.startswith(".partitions.json.")


def test_column_labels_are_partitioned_as_flat_ones():
    # MedMNIST and other readers give labels as an (N, 1) column.
    flat = np.repeat(np.arange(4), 10)
    column = assign_sites(flat[:, None], np.arange(4)[:, None], 2, "iid", seed=3)
    expected = assign_sites(flat, np.arange(4), 2, "iid", seed=3)
    for got, want in zip(column.train + column.test, expected.train + expected.test, strict=True):
        np.testing.assert_array_equal(got, want)
