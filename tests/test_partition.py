"""Partitioners, per-site test sets and the partitions report."""

import json
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
