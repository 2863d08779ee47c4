"""What a clinician reads from a run: calibration, per-class sensitivity and specificity and the
confusion matrix, central and at every site, recomputed here from the run's saved prompt; the
figures it writes; sites whose test sets lack classes still agree on what they send."""

import json

import numpy as np
import pytest
import torch

from fedprompt.config import compose_config
from fedprompt.data.features import PROCESS_FEATURE_CACHE
from fedprompt.evaluation.plots import CONFUSION_PLOT, RELIABILITY_PLOT, SITE_RELIABILITY_PLOT
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import _final_metrics, run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.site_rounds import backbone_for, build_learner, evaluate_round, splits_and_plan
from fedprompt.training import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


@pytest.fixture(scope="module")
def label_skewed_run(tmp_path_factory):
    """Two rounds over three sites that each hold two of the four classes, bins shared."""
    out = tmp_path_factory.mktemp("clinical") / "run"
    overrides = [
        "federation.rounds=2",
        "partition=pathological",
        "partition.classes_per_site=2",
        "evaluation.share_site_histograms=true",
        f"output_dir={out}",
    ]
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": 3} for i in range(3)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
    )
    cfg = compose_config("quickstart", overrides)
    summary = run_federation(grid, cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, out, summary, lines


def test_sites_missing_classes_are_all_scored_and_none_rejected(label_skewed_run):
    _, _, summary, lines = label_skewed_run
    for line in lines:
        assert line["rejected"] == {} and line["federated_accuracy"] is not None
        # A site holding two classes has no sensitivity for the other two (null, not 0).
        for site in line["sites"].values():
            assert site["sensitivity"].count(None) == 2
            assert None not in site["specificity"]
    assert len(summary["final"]["per_site"]) == 3


def test_per_site_values_are_the_saved_prompts_scores_at_each_site(label_skewed_run):
    cfg, out, summary, lines = label_skewed_run
    state = torch.load(out / "global_state.pt")
    for index in range(3):
        name = f"site-{index}"
        scores = evaluate_round(cfg, index, state).metrics
        sent = lines[-1]["sites"][name]
        assert sent["ece"] == pytest.approx(scores.ece)
        assert sent["brier"] == pytest.approx(scores.brier)
        assert sent["sensitivity"] == pytest.approx(list(scores.sensitivity))
        assert sent["specificity"] == pytest.approx(list(scores.specificity))
        # The shared counts are the site's bins (counts only: no confidence leaves the site).
        assert sent["reliability"] == {
            "count": list(scores.reliability.count),
            "correct": list(scores.reliability.correct),
        }
        assert sum(sent["reliability"]["count"]) == sent["num_test"]
        reported = summary["final"]["per_site"][name]
        assert reported["ece"] == sent["ece"] and reported["brier"] == sent["brier"]
        assert reported["per_class"]["sensitivity"] == dict(
            zip(CLASSES, sent["sensitivity"], strict=True)
        )


def test_the_central_scores_are_the_saved_prompts_on_the_test_split(label_skewed_run):
    cfg, out, summary, _ = label_skewed_run
    splits, _ = splits_and_plan(cfg)
    backbone = backbone_for(cfg)
    learner = build_learner(cfg, backbone, list(splits.classnames))
    learner.load_trainable_state(torch.load(out / "global_state.pt"))
    features, labels = PROCESS_FEATURE_CACHE.get(backbone, splits.test)
    scores = evaluate(learner, features, labels, len(CLASSES))
    final = summary["final"]
    assert final["source"] == "central"
    assert final["ece"] == pytest.approx(scores.ece)
    assert final["brier"] == pytest.approx(scores.brier)
    assert final["confusion_matrix"] == {
        "classnames": CLASSES,
        "counts": [list(row) for row in scores.confusion_matrix],
    }
    assert np.sum(final["confusion_matrix"]["counts"]) == len(labels)
    assert list(final["per_class"]["sensitivity"].values()) == pytest.approx(
        list(scores.sensitivity)
    )
    assert list(final["per_class"]["specificity"]) == CLASSES
    # What existed before is still there, under the same names.
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "federated_accuracy", "per_site"):
        assert key in final
    saved = json.loads((out / "summary.json").read_text())["final"]
    assert saved["confusion_matrix"] == final["confusion_matrix"]


def test_the_figures_are_written_into_the_results_folder(label_skewed_run):
    _, out, _, _ = label_skewed_run
    for name in (RELIABILITY_PLOT, CONFUSION_PLOT, SITE_RELIABILITY_PLOT):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


def _line(central, sites):
    return {
        "central": central,
        "sites": sites,
        "federated_accuracy": 0.5,
        "held_out": [],
    }


def test_without_a_central_split_calibration_is_the_sites_weighted_mean():
    sites = {
        "a": {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "num_test": 10},
        "b": {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0, "num_test": 30},
    }
    sites["a"] |= {"ece": 0.2, "brier": 0.4, "sensitivity": [0.5, None], "specificity": [1, 0]}
    sites["b"] |= {"ece": 0.1, "brier": 0.2, "sensitivity": [1.0, 1.0], "specificity": [1, 1]}
    final = _final_metrics([_line(None, sites)], ["x", "y"], lambda site: ["x", "y"])
    assert final["source"] == "federated"
    assert final["ece"] == pytest.approx((0.2 * 10 + 0.1 * 30) / 40)
    assert final["brier"] == pytest.approx((0.4 * 10 + 0.2 * 30) / 40)
    # Pooling per-class values needs each site's images per class, which no site sends.
    assert final["per_class"] is None and final["confusion_matrix"] is None
    assert final["per_site"]["a"]["per_class"] == {
        "sensitivity": {"x": 0.5, "y": None},
        "specificity": {"x": 1, "y": 0},
    }
