"""Plots are written as PNGs: study points, metrics.jsonl lines, the sites' scanners, reliability
diagrams and confusion matrices."""

import math

import numpy as np
import pytest
from PIL import Image

from fedprompt.data.acquisition import site_profiles
from fedprompt.evaluation.metrics import Reliability
from fedprompt.evaluation.plots import (
    StudyPoint,
    accuracy_per_round,
    accuracy_vs_epsilon,
    confusion_heatmap,
    metric_vs_epsilon,
    per_site_accuracy,
    reliability_diagram,
    round_accuracies,
    site_reliability_diagrams,
    site_views,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _points():
    points = []
    for method, base in (("coop", 0.70), ("biomedcoop", 0.76)):
        for seed in range(3):
            for epsilon, drop in ((1.0, 0.20), (2.0, 0.12), (4.0, 0.07), (8.0, 0.04)):
                accuracy = base - drop + 0.01 * (seed - 1)
                points.append(StudyPoint(method, epsilon, seed, accuracy, 0.5 + drop / 4))
            points.append(StudyPoint(method, math.inf, seed, base + 0.01 * seed, 0.58))
    return points


def test_accuracy_vs_epsilon_png(tmp_path):
    path = tmp_path / "plots" / "accuracy_vs_epsilon.png"
    figure = accuracy_vs_epsilon(_points(), path, title="BTMRI, 5 sites")
    assert path.read_bytes()[:8] == PNG_MAGIC
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["biomedcoop", "biomedcoop, no DP", "coop", "coop, no DP"]
    # One error bar per (method, finite epsilon), spread over three seeds.
    assert len(axes.containers) == 2


def test_attack_auc_vs_epsilon_marks_chance(tmp_path):
    path = tmp_path / "mia.png"
    figure = metric_vs_epsilon(_points(), path, metric="mia_auc")
    assert path.exists()
    assert "chance" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    with pytest.raises(ValueError, match="mia_auc"):
        metric_vs_epsilon([StudyPoint("coop", 1.0, 0, 0.5)], metric="mia_auc")


def test_accuracy_per_round_from_metrics_lines(tmp_path):
    lines = [
        {"round": 1, "central": {"accuracy": 0.5}, "federated_accuracy": 0.45},
        {"round": 2, "central": None, "federated_accuracy": 0.55},
        {"round": 3, "central": {"accuracy": 0.7}, "federated_accuracy": None},
    ]
    assert round_accuracies(lines) == [(1, 0.5), (3, 0.7)]
    assert round_accuracies(lines, source="federated") == [(1, 0.45), (2, 0.55)]
    runs = {
        "coop, no DP": [[(r, 0.4 + 0.05 * r + 0.01 * s) for r in range(1, 11)] for s in range(3)],
        "coop, epsilon 4": [
            [(r, 0.35 + 0.03 * r + 0.02 * s) for r in range(1, 11)] for s in range(3)
        ],
    }
    path = tmp_path / "rounds.png"
    figure = accuracy_per_round(runs, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == [
        "coop, no DP (n=3)",
        "coop, epsilon 4 (n=3)",
    ]
    with pytest.raises(ValueError, match="No run"):
        accuracy_per_round({"empty": [[]]})


def test_site_views_show_the_stored_image_and_each_sites_acquisition(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
    profiles = site_profiles("scanner", seed=0, num_sites=7)
    names = [f"site-{i}" for i in range(7)]
    path = tmp_path / "acquisition.png"
    figure = site_views(image, "img/0", profiles, names, path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    drawn = [axes for axes in figure.axes if axes.images]
    assert [axes.get_title().split("\n")[0] for axes in drawn] == ["as stored", *names]
    assert np.array_equal(drawn[0].images[0].get_array(), np.asarray(image))
    seen = np.asarray(profiles[3](image, "img/0"))
    assert np.array_equal(drawn[4].images[0].get_array(), seen)
    with pytest.raises(ValueError, match="7 profiles for 2 sites"):
        site_views(image, "img/0", profiles, names[:2])


def test_per_site_accuracy_sets_each_sites_global_beside_its_personalized_bar(tmp_path):
    seeds = [
        {
            "site-0": {"accuracy": 0.50 + d, "num_test": 9, "personalized_accuracy": 0.70 + d},
            "site-1": {"accuracy": 0.40 + d, "num_test": 9, "personalized_accuracy": 0.30 + d},
            "site-2": {"accuracy": 0.20 + d, "num_test": 9, "held_out": True},
        }
        for d in (0.0, 0.1)
    ]
    without = [{"site-0": {"accuracy": 0.5, "num_test": 9}}]  # no scheme: not drawn
    path = tmp_path / "per_site_accuracy.png"
    figure = per_site_accuracy({"coop, promptfolio": seeds, "coop": without}, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    (axes,) = [axes for axes in figure.axes if axes.patches]
    assert axes.get_title() == "coop, promptfolio (n=2)"
    heights = [round(bar.get_height(), 6) for bar in axes.patches]
    # Global bars of the three sites (mean over the two seeds), then the two personalized ones;
    # the held-out site has none of its own.
    assert heights == [55.0, 45.0, 25.0, 75.0, 35.0]
    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert labels == ["site-0", "site-1", "site-2\n(held out)"]
    with pytest.raises(ValueError, match="No site has a personalized accuracy"):
        per_site_accuracy({"coop": without})


# 10 images: 4 in bin 10 (2 right), 6 in bin 14 (6 right); summed confidences 2.84 and 5.7.
BINS = Reliability(
    tuple(4 if b == 10 else 6 if b == 14 else 0 for b in range(15)),
    tuple(2 if b == 10 else 6 if b == 14 else 0 for b in range(15)),
    tuple(2.84 if b == 10 else 5.7 if b == 14 else 0.0 for b in range(15)),
)


def test_reliability_diagram_shows_accuracy_and_count_per_bin_and_the_ece(tmp_path):
    path = tmp_path / "reliability_diagram.png"
    figure = reliability_diagram(BINS, path, title="central")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    accuracy_axes, count_axes = figure.axes
    # ECE = 0.4 |0.5 - 0.71| + 0.6 |1 - 0.95| = 0.114
    assert accuracy_axes.get_title() == "central: ECE 11.4%"
    assert [round(bar.get_height(), 6) for bar in accuracy_axes.patches] == [0.5, 1.0]
    assert [bar.get_height() for bar in count_axes.patches if bar.get_height()] == [4, 6]
    # Counts alone (what a site shares) take the ECE the site reported.
    counts_only = Reliability(BINS.count, BINS.correct)
    assert reliability_diagram(counts_only, ece=0.2).axes[0].get_title() == "ECE 20.0%"


def test_site_reliability_diagrams_give_each_site_its_panels(tmp_path):
    path = tmp_path / "reliability_diagram_per_site.png"
    sites = {f"site-{i}": (Reliability(BINS.count, BINS.correct), 0.1 * i) for i in range(5)}
    figure = site_reliability_diagrams(sites, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
    assert titles[0] == "site-0: ECE 0.0%, 10 images" and len(titles) == 5
    with pytest.raises(ValueError, match="share_site_histograms"):
        site_reliability_diagrams({})


def test_confusion_heatmap_writes_every_count(tmp_path):
    path = tmp_path / "confusion_matrix.png"
    counts = [[5, 1, 0], [2, 7, 0], [0, 3, 9]]
    figure = confusion_heatmap(counts, ["glioma", "meningioma", "normal"], path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    axes = figure.axes[0]
    assert [text.get_text() for text in axes.texts] == [str(n) for row in counts for n in row]
    assert [label.get_text() for label in axes.get_yticklabels()] == [
        "glioma",
        "meningioma",
        "normal",
    ]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted class", "true class")
    with pytest.raises(ValueError, match="shape \\(3, 3\\) for 2 classes"):
        confusion_heatmap(counts, ["a", "b"])


def test_ece_against_epsilon_in_percent(tmp_path):
    points = [
        StudyPoint("coop", epsilon, seed, 0.5, ece=ece + 0.01 * seed)
        for epsilon, ece in ((1.0, 0.2), (8.0, 0.1), (math.inf, 0.05))
        for seed in range(2)
    ]
    figure = metric_vs_epsilon(points, tmp_path / "ece.png", metric="ece")
    axes = figure.axes[0]
    assert axes.get_ylabel() == "expected calibration error (%)"
    (bars,) = axes.containers  # the mean over the two seeds at epsilon 1 and 8, in percent
    assert bars.get_label() == "coop"
    assert list(bars[0].get_ydata()) == pytest.approx([20.5, 10.5])
    with pytest.raises(ValueError, match="ece"):
        metric_vs_epsilon([StudyPoint("coop", 1.0, 0, 0.5)], metric="ece")
