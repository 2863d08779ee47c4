"""The server's side of a run: the global prompt scored on datasets no site holds, and sites
that each hold a different dataset (task) sharing one prompt."""

import json
from pathlib import Path

import pytest
import torch

from fedprompt.config import ConfigError, compose_config
from fedprompt.config_schema import check_config
from fedprompt.data.features import PROCESS_FEATURE_CACHE
from fedprompt.data.sites import load_splits, with_dataset
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.site_rounds import backbone_for, build_learner, open_site
from fedprompt.training import evaluate

SHARED = Path(__file__).parents[1] / "../shared/data"


def _run(tmp_path, *extra):
    overrides = ["federation.rounds=1", f"output_dir={tmp_path / 'run'}", *extra]
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": 3} for i in range(3)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
    )
    return run_federation(grid, compose_config("quickstart", overrides))


@pytest.fixture
def medmnist(monkeypatch):
    if not (SHARED / "medmnist/breastmnist.npz").is_file():
        pytest.skip("../shared/data/medmnist/breastmnist.npz is absent")
    monkeypatch.setenv("FEDPROMPT_DATA", str(SHARED.resolve()))


def test_the_global_prompt_is_scored_on_an_unseen_dataset_with_its_own_classes(tmp_path, medmnist):
    summary = _run(tmp_path, "evaluation.unseen_datasets=[breastmnist]")
    unseen = summary["final"]["unseen_dataset_accuracy"]
    assert set(unseen) == {"breastmnist"}
    # The same number, recomputed from the saved prompt on breastmnist's own two classes.
    cfg = with_dataset(compose_config("quickstart", []), "breastmnist")
    splits = load_splits(cfg)
    backbone = backbone_for(cfg)
    learner = build_learner(cfg, backbone, list(splits.classnames))
    learner.load_trainable_state(torch.load(tmp_path / "run/global_state.pt"))
    features, labels = PROCESS_FEATURE_CACHE.get(backbone, splits.test)
    assert unseen["breastmnist"] == evaluate(learner, features, labels, 2).accuracy
    line = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert line["unseen_datasets"] == unseen


def test_a_class_dependent_method_is_refused_for_an_unseen_dataset(tmp_path, medmnist):
    with pytest.raises(ConfigError, match="cannot serve the unseen dataset breastmnist"):
        _run(tmp_path, "evaluation.unseen_datasets=[breastmnist]", "method.class_specific=true")


def test_unseen_datasets_are_refused_where_the_centre_holds_no_images():
    cfg = compose_config(
        "quickstart", ["evaluation.unseen_datasets=[breastmnist]", "federation.mode=deployment"]
    )
    with pytest.raises(ConfigError, match="in deployment the centre holds none"):
        check_config(cfg)


def test_an_unknown_unseen_dataset_is_one_sentence():
    with pytest.raises(ConfigError, match="dataset brestmnist is not one of fedprompt's"):
        with_dataset(compose_config("quickstart", []), "brestmnist")


TASKS = [
    "federation.site_datasets=[btmri_mini,breastmnist]",
    "federation.num_sites=2",
    "evaluation.central=false",
    "train.shots=4",
]


def test_two_sites_with_different_class_lists_train_one_shared_context(tmp_path, medmnist):
    overrides = [*TASKS, "federation.rounds=2", f"output_dir={tmp_path / 'run'}"]
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": 2} for i in range(2)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
    )
    cfg = compose_config("quickstart", overrides)
    summary = run_federation(grid, cfg)
    assert summary["dataset"] == "btmri_mini+breastmnist"
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(line["aggregated"] == {"site-0": 16, "site-1": 8} for line in lines)
    partitions = json.loads((tmp_path / "run/partitions.json").read_text())
    assert [site["classnames"] for site in partitions["sites"]] == [
        ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"],
        ["malignant", "normal, benign"],
    ]
    # Each site scored the shared context on its own test images and its own classes.
    state = torch.load(tmp_path / "run/global_state.pt")
    for index, num_classes in ((0, 4), (1, 2)):
        session = open_site(cfg, index)
        assert len(session.data.classnames) == num_classes
        features, labels = session.features("test")
        expected = evaluate(session.learner(state), features, labels, num_classes).accuracy
        assert summary["final"]["per_site"][f"site-{index}"]["accuracy"] == expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["method.class_specific=true"], "method=coop with method.class_specific=true learns"),
        (["method=linear_probe"], "method=linear_probe learns nothing shared"),
        (["federation.num_sites=3"], "set federation.num_sites=2"),
        (["evaluation.central=true"], "there is no one central test split"),
        (["partition=dirichlet"], "partition=dirichlet would not change"),
        (["federation.mode=deployment"], "a deployed federation shares one class list"),
    ],
)
def test_sites_with_different_tasks_refuse_what_cannot_apply(extra, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_config(compose_config("quickstart", [*TASKS, *extra]))
    assert "\n" not in str(caught.value)
