import json
from pathlib import Path

import numpy as np
import pytest

import fedprompt.config
from fedprompt.cli import main
from fedprompt.config import compose_config
from fedprompt.data.image_set import DataError
from fedprompt.data.sites import (
    dataset_config,
    load_splits,
    plan_report,
    plan_sites,
    site_data,
)
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config

SHARED = Path(__file__).parents[1] / "../shared/data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "btmri-mini").is_dir(), reason="../shared/data/btmri-mini is absent"
)


def _without_shared(tmp_path, monkeypatch):
    """As in a checkout without ../shared beside it: the shipped relative root resolves nowhere."""
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fedprompt.config, "PROJECT_DIR", tmp_path / "checkout")
    monkeypatch.chdir(tmp_path)


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
