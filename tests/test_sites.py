import functools
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import fedprompt.config
from fedprompt import site_rounds
from fedprompt.cli import main
from fedprompt.config import compose_config
from fedprompt.data.acquisition import draw_profile
from fedprompt.data.image_set import DataError
from fedprompt.data.sites import (
    dataset_config,
    load_splits,
    plan_report,
    plan_sites,
    site_data,
    write_site_views,
)
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.local_simulation import check_before_flower
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config

SHARED = Path(__file__).parents[1] / "../shared/data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "btmri-mini").is_dir(), reason="../shared/data/btmri-mini is absent"
)


def _without_shared(tmp_path, monkeypatch):
    """As in a checkout without ../shared beside it: the shipped relative root resolves nowhere.

    With an empty cache of the sites' splits for the test: the config names the same relative
    root either way, so the process's cache would hand the stand-in's splits to later tests (and
    the real ones to this test, had another test read them first).
    """
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fedprompt.config, "PROJECT_DIR", tmp_path / "checkout")
    monkeypatch.chdir(tmp_path)
    fresh = functools.lru_cache(maxsize=8)(site_rounds._splits_and_plan.__wrapped__)
    monkeypatch.setattr(site_rounds, "_splits_and_plan", fresh)


def test_missing_quickstart_data_gets_a_synthetic_stand_in(tmp_path, monkeypatch):
    _without_shared(tmp_path, monkeypatch)
    cfg = compose_config("quickstart", [])
    stand_in = dataset_config(cfg)
    assert stand_in["name"] == "synthetic-btmri_mini"
    assert stand_in["format"] == "synthetic"
    assert stand_in["classnames"] == list(cfg.dataset.classnames)
    assert stand_in["root"] == str(tmp_path / "cache" / "synthetic")
    synthetic = compose_config(None, ["dataset=synthetic"]).dataset
    for key in ("train_per_class", "val_per_class", "test_per_class", "image_size", "seed"):
        assert stand_in[key] == synthetic[key]
    splits = load_splits(cfg)
    assert splits.classnames == list(cfg.dataset.classnames)
    assert len(splits.train) == 4 * stand_in["train_per_class"]


def test_missing_data_without_fallback_is_not_replaced(tmp_path):
    cfg = compose_config(None, [f"dataset.root={tmp_path / 'absent'}"])
    assert dataset_config(cfg)["format"] == "biomedcoop"


def test_a_root_the_user_chose_that_does_not_exist_is_an_error_not_a_stand_in(tmp_path, capsys):
    absent = tmp_path / "nonexistent" / "dir"
    cfg = compose_config("quickstart", [f"dataset.root={absent}"])
    assert dataset_config(cfg)["format"] == "biomedcoop"
    with pytest.raises(
        DataError, match=f"Dataset BTMRI was not found: expected the split file {absent}"
    ):
        load_splits(cfg)
    out = tmp_path / "run"
    assert main(["simulate", "quickstart", f"dataset.root={absent}", f"output_dir={out}"]) == 2
    assert "Dataset BTMRI was not found" in capsys.readouterr().err and not out.exists()


def test_a_run_on_the_stand_in_says_so_in_every_line_and_the_summary(tmp_path, monkeypatch):
    _without_shared(tmp_path, monkeypatch)
    overrides = ["federation.rounds=2", "train.local_epochs=1", f"output_dir={tmp_path / 'run'}"]
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": 3} for i in range(3)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
    )
    summary = run_federation(grid, compose_config("quickstart", overrides))
    assert summary["dataset"] == "synthetic-btmri_mini"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["dataset"] for line in lines] == ["synthetic-btmri_mini"] * 2


@needs_shared
def test_sites_hold_disjoint_few_shot_training_images_and_own_test_images():
    cfg = compose_config("quickstart", ["train.shots=2", "federation.num_sites=3"])
    splits = load_splits(cfg)
    plan = plan_sites(cfg, splits)
    sites = [site_data(cfg, splits, plan, i) for i in range(3)]
    for site in sites:
        assert np.all(site.train.class_counts() <= 2)
        assert site.train.class_counts().sum() == 8  # 4 classes, 2 shots, iid shards of 40
        assert len(site.test) > 0
    train_ids = [set(site.train.identities) for site in sites]
    assert not (train_ids[0] & train_ids[1]) and not (train_ids[1] & train_ids[2])
    report = plan_report(cfg, splits, plan)
    assert [s["train_size"] for s in report["sites"]] == [8, 8, 8]
    assert report["params"]["shots"] == 2
    used = [splits.train.identities[i] for i in report["sites"][0]["train_indices"]]
    assert set(used) == train_ids[0]


@needs_shared
def test_site_assignment_is_deterministic_and_seeded():
    cfg = compose_config("quickstart", ["train.shots=1"])
    splits = load_splits(cfg)
    first = site_data(cfg, splits, plan_sites(cfg, splits), 0).train.identities
    again = site_data(cfg, splits, plan_sites(cfg, splits), 0).train.identities
    other_cfg = compose_config("quickstart", ["train.shots=1", "seed=5"])
    other = site_data(other_cfg, splits, plan_sites(other_cfg, splits), 0).train.identities
    assert first == again and first != other


@needs_shared
def test_site_index_outside_the_federation_is_refused():
    cfg = compose_config("quickstart")
    splits = load_splits(cfg)
    with pytest.raises(ValueError, match="outside"):
        site_data(cfg, splits, plan_sites(cfg, splits), 3)


def _hospitals(folder, sites=("BCN", "MSK", "Vienna"), per_class=4):
    """A manifest of three hospitals, two classes each; each class a different brightness."""
    rng = np.random.default_rng(0)
    rows = ["path,label,site,split"]
    for site in sites:
        for label, name in enumerate(["benign", "malignant"]):
            for i in range(per_class):
                pixels = (rng.random((24, 24, 3)) * 80 + 120 * label).astype(np.uint8)
                path = folder / site / f"{name}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
                rows.append(f"{site}/{name}{i}.png,{name},{site},{'test' if i == 0 else 'train'}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ["dataset=manifest", f"dataset.root={folder}"]


def test_natural_sites_from_the_config_hold_their_hospitals_images(tmp_path):
    cfg = compose_config("quickstart", [*_hospitals(tmp_path), "partition=natural"])
    splits = load_splits(cfg)
    plan = plan_sites(cfg, splits)
    assert plan.site_names == ["BCN", "MSK", "Vienna"]
    for index, name in enumerate(plan.site_names):
        site = site_data(cfg, splits, plan, index)
        assert {i.split("/")[1] for i in site.train.identities + site.test.identities} == {name}
        assert site.train.class_counts().tolist() == [3, 3]
        assert site.test.class_counts().tolist() == [1, 1]
    report = plan_report(cfg, splits, plan)
    assert report["scheme"] == "natural"
    assert report["params"]["manifest"] == str(tmp_path / "manifest.csv")
    assert [s["name"] for s in report["sites"]] == plan.site_names


def test_a_num_sites_mismatch_stops_before_flower_in_one_sentence(tmp_path, capsys):
    overrides = [*_hospitals(tmp_path), "partition=natural", "federation.num_sites=5"]
    with pytest.raises(DataError, match=r"but federation.num_sites=5; set federation.num_sites=3"):
        check_before_flower(compose_config("quickstart", overrides))
    out = tmp_path / "run"
    assert main(["simulate", "quickstart", *overrides, f"output_dir={out}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "partition=natural federates the 3 sites" in error and "\n" not in error
    assert not out.exists()


@pytest.mark.parametrize("partition", ["iid", "natural"])
def test_scanner_profiles_reach_each_sites_train_and_test_images(tmp_path, partition):
    overrides = [*_hospitals(tmp_path), f"partition={partition}", "partition.acquisition=scanner"]
    cfg = compose_config("quickstart", overrides)
    splits = load_splits(cfg)
    plan = plan_sites(cfg, splits)
    report = plan_report(cfg, splits, plan)
    assert report["acquisition"] == "scanner"
    seen = [site_data(cfg, splits, plan, index) for index in range(3)]
    for index, site in enumerate(seen):
        profile = draw_profile(0, index)
        assert site.train.acquisition == site.test.acquisition == profile
        assert report["sites"][index]["acquisition"] == profile.record()
        stored, _ = site.test.with_acquisition(None)[0]
        assert np.array_equal(
            np.asarray(site.test[0][0]), np.asarray(profile(stored, site.test.identities[0]))
        )
        assert not np.array_equal(np.asarray(site.test[0][0]), np.asarray(stored))
    assert len({site.train.acquisition.key for site in seen}) == 3
    views = write_site_views(cfg, splits, plan, tmp_path / "results")
    assert views == tmp_path / "results" / "acquisition.png"
    assert Image.open(views).format == "PNG"


def test_without_scanners_sites_read_their_images_as_stored_and_no_plot_is_written(tmp_path):
    cfg = compose_config("quickstart", _hospitals(tmp_path))
    splits = load_splits(cfg)
    plan = plan_sites(cfg, splits)
    assert site_data(cfg, splits, plan, 0).train.acquisition is None
    report = plan_report(cfg, splits, plan)
    assert report["acquisition"] == "none"
    assert [s["acquisition"] for s in report["sites"]] == [None, None, None]
    assert write_site_views(cfg, splits, plan, tmp_path / "results") is None
    assert not (tmp_path / "results").exists()
    # A deployed site's config carries no acquisition key: its images are read as stored.
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["partition"] = {"name": "iid"}
    assert site_data(OmegaConf.create(plain), splits, plan, 0).test.acquisition is None


def test_the_site_views_fall_back_to_a_training_image_without_test_images(tmp_path):
    folder = tmp_path / "data"
    overrides = [*_hospitals(folder), "partition.acquisition=scanner", "dataset.test_fraction=0"]
    manifest = folder / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    cfg = compose_config("quickstart", overrides)
    splits = load_splits(cfg)
    assert len(splits.test) == 0
    with pytest.warns(UserWarning, match="no test images"):
        plan = plan_sites(cfg, splits)
    views = write_site_views(cfg, splits, plan, tmp_path / "results")
    assert views is not None and views.is_file()


def test_a_run_on_natural_sites_with_scanners_records_them_in_its_results(tmp_path):
    overrides = [
        *_hospitals(tmp_path / "data"),
        "partition=natural",
        "partition.acquisition=scanner",
        "federation.rounds=1",
        "train.local_epochs=1",
        "evaluation.central=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": 3} for i in range(3)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
    )
    summary = run_federation(grid, compose_config("quickstart", overrides))
    assert summary["status"] == "completed"
    assert set(summary["final"]["per_site"]) == {"BCN", "MSK", "Vienna"}
    partitions = json.loads((tmp_path / "run" / "partitions.json").read_text())
    assert [s["acquisition"]["key"] for s in partitions["sites"]] == [
        draw_profile(0, i).key for i in range(3)
    ]
    assert (tmp_path / "run" / "acquisition.png").is_file()
