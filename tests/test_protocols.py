"""Evaluation protocols: few-shot over all classes, and base-to-novel with its harmonic mean."""

import json

import numpy as np
import pytest
import torch

from fedprompt.config import ConfigError, compose_config
from fedprompt.data.features import PROCESS_FEATURE_CACHE
from fedprompt.data.image_set import DatasetSplits, ImageSet
from fedprompt.data.protocols import (
    base_class_count,
    class_subset,
    novel_splits,
    protocol_report,
    training_splits,
)
from fedprompt.data.sites import load_splits
from fedprompt.evaluation.metrics import BaseToNovelMetrics, ClassificationMetrics
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.site_rounds import backbone_for, build_learner, splits_and_plan
from fedprompt.training import evaluate

NAMES = ["a", "b", "c", "d", "e"]


def _images(labels):
    return ImageSet(
        np.zeros((len(labels), 4, 4), dtype=np.uint8),
        labels,
        NAMES,
        identities=[f"img/{i}" for i in range(len(labels))],
    )


def _splits():
    train = _images([0, 1, 2, 3, 4, 4, 3, 2, 1, 0])
    test = _images([4, 3, 2, 1, 0])
    return DatasetSplits(name="toy", classnames=NAMES, train=train, val=None, test=test)


@pytest.mark.parametrize(("classes", "base"), [(2, 1), (3, 2), (4, 2), (5, 3), (11, 6)])
def test_base_classes_are_the_first_half_rounded_up(classes, base):
    assert base_class_count(classes) == base


def test_one_class_has_no_novel_half():
    with pytest.raises(ConfigError, match="at least two classes"):
        base_class_count(1)


def test_subsets_are_relabelled_and_keep_identities():
    images = _images([0, 3, 4, 3, 1])
    novel = class_subset(images, [3, 4])
    assert novel.classnames == ["d", "e"]
    assert novel.labels.tolist() == [0, 1, 0]
    assert novel.identities == ["img/1", "img/2", "img/3"]


def test_the_sites_see_only_base_classes_and_novel_is_the_rest():
    splits = _splits()
    assert training_splits({"name": "few_shot"}, splits) is splits
    base = training_splits({"name": "base_to_novel"}, splits)
    novel = novel_splits(splits)
    assert base.classnames == ["a", "b", "c"] and novel.classnames == ["d", "e"]
    assert sorted(base.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(novel.test.labels.tolist()) == [0, 1]
    assert set(base.train.identities).isdisjoint(novel_splits(splits).train.identities)


def test_unknown_protocol_is_one_sentence():
    with pytest.raises(ConfigError, match="Unknown protocol 'zero_shot'"):
        training_splits({"name": "zero_shot"}, _splits())


def test_report_names_the_halves():
    report = protocol_report({"name": "base_to_novel"}, 4, NAMES)
    assert report == {
        "name": "base_to_novel",
        "shots": 4,
        "base_classes": ["a", "b", "c"],
        "novel_classes": ["d", "e"],
    }
    assert protocol_report(None, 0) == {"name": "few_shot", "shots": 0}


def test_harmonic_mean_by_hand():
    base = ClassificationMetrics(0.8, 0.8, 0.8, 10)
    novel = ClassificationMetrics(0.4, 0.4, 0.4, 10)
    metrics = BaseToNovelMetrics(base, novel).as_dict()
    assert metrics["harmonic_mean"] == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert metrics["accuracy"] == metrics["base_accuracy"] == 0.8
    assert BaseToNovelMetrics(ClassificationMetrics(0, 0, 0, 1), novel).harmonic_mean == 0.0


def _run(folder, extra=()):
    overrides = [
        "train.local_epochs=1",
        "federation.rounds=1",
        "protocol=base_to_novel",
        f"output_dir={folder}",
        *extra,
    ]
    run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}
    grid = InProcessGrid([{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
    return run_federation(grid, compose_config("quickstart", overrides)), overrides


def test_a_federated_base_to_novel_run_scores_both_halves(tmp_path):
    summary, overrides = _run(tmp_path)
    cfg = compose_config("quickstart", overrides)
    full = load_splits(cfg)
    assert summary["protocol"]["base_classes"] == full.classnames[:2]
    assert summary["protocol"]["novel_classes"] == full.classnames[2:]
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert partitions["classnames"] == full.classnames[:2]
    splits, _ = splits_and_plan(cfg)
    assert splits.classnames == full.classnames[:2]
    # The novel accuracy, recomputed here from the saved prompt with the novel class list.
    state = torch.load(tmp_path / "global_state.pt", weights_only=True)
    novel = novel_splits(full)
    learner = build_learner(cfg, backbone_for(cfg), list(novel.classnames))
    learner.load_trainable_state(state)
    features, labels = PROCESS_FEATURE_CACHE.get(backbone_for(cfg), novel.test, 32)
    expected = evaluate(learner, features, labels, len(novel.classnames)).accuracy
    final = summary["final"]
    assert final["novel_accuracy"] == pytest.approx(expected)
    b, n = final["base_accuracy"], final["novel_accuracy"]
    assert final["harmonic_mean"] == pytest.approx(2 * b * n / (b + n))
    assert final["accuracy"] == b


def test_a_class_specific_prompt_cannot_be_tested_on_novel_classes(tmp_path):
    with pytest.raises(ConfigError, match="depends on the class list"):
        _run(tmp_path, ["method=linear_probe"])
