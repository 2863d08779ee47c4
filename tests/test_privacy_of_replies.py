"""Nothing private leaves a site: every reply of a run holds only the trainable tensors and
scalar metrics (under personalization, the global part only), and a failing site's reply names
no file. Per-bin counts of a site's test set leave it only where the run asks for them."""

import pytest
from flwr.app import MessageType
from sites_on_disk import corrupt_one_image, write_site

from fedprompt.config import compose_config
from fedprompt.evaluation.plots import SITE_RELIABILITY_PLOT
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.personalization.local_store import LocalStore
from fedprompt.site_rounds import backbone_for, build_learner

TRAIN_METRICS = {"num-examples", "train-loss", "train-steps", "train-seconds"}
EVALUATE_METRICS = {"num-examples", "accuracy", "balanced-accuracy", "macro-f1", "ece", "brier"}
# Every site of these runs holds test images of all four classes (and of others than each).
PER_CLASS_METRICS = {f"{name}-{k}" for name in ("sensitivity", "specificity") for k in range(4)}
HISTOGRAM_METRICS = {f"reliability-{kind}-{b}" for kind in ("count", "correct") for b in range(15)}


def _simulated(tmp_path):
    overrides = ["federation.rounds=2", "train.local_epochs=1", f"output_dir={tmp_path / 'run'}"]
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    return overrides, nodes, [], {"site-index"}


def _personalized(tmp_path):
    overrides, nodes, names, identity = _simulated(tmp_path)
    return [*overrides, "personalization=promptfolio"], nodes, names, identity


def _histograms(tmp_path):
    overrides, nodes, names, identity = _simulated(tmp_path)
    return [*overrides, "evaluation.share_site_histograms=true"], nodes, names, identity


def _deployed(tmp_path):
    overrides = [
        "federation.mode=deployment",
        "federation.num_sites=3",
        "federation.rounds=2",
        "train.local_epochs=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    # hospital-x always has a corrupt image: the feature cache keys images by name, so a site
    # name that another test uses with intact images would be read from the cache instead.
    names = ["hospital-a", "hospital-b", "hospital-x"]
    configs = [write_site(tmp_path, name, seed=i) for i, name in enumerate(names)]
    corrupt_one_image(configs[2])
    nodes = [{"site-config": str(config)} for config in configs]
    return overrides, nodes, names, set()


@pytest.mark.parametrize(
    "setup",
    [_simulated, _deployed, _personalized, _histograms],
    ids=["simulation", "deployment", "personalized", "histograms"],
)
def test_every_reply_holds_only_trainable_tensors_and_scalar_metrics(tmp_path, setup):
    overrides, nodes, names, identity = setup(tmp_path)
    cfg = compose_config("quickstart", overrides)
    run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}
    grid = InProcessGrid(nodes, run_config, names=names)
    run_federation(grid, cfg)

    trainable = build_learner(
        cfg, backbone_for(cfg), list(cfg.dataset.classnames)
    ).trainable_state()
    kinds = {MessageType.TRAIN: 0, MessageType.EVALUATE: 0, "error": 0}
    for reply in grid.replies:
        if reply.has_error():
            kinds["error"] += 1
            # A site that cannot take part says so without naming its files or folders.
            assert str(tmp_path) not in reply.error.reason and ".png" not in reply.error.reason
            continue
        content = reply.content
        assert not content.config_records  # no strings, no paths, no file lists
        (metrics,) = content.metric_records.values()
        assert all(type(value) in (int, float) for value in metrics.values())  # no lists
        if reply.metadata.message_type == MessageType.TRAIN:
            assert set(metrics) == TRAIN_METRICS | identity
            (arrays,) = content.array_records.values()
            assert set(arrays) == set(trainable)
            for key, array in arrays.items():
                assert tuple(array.shape) == tuple(trainable[key].shape)
        else:
            personal = {"personalized-accuracy"} if setup is _personalized else set()
            # Bin counts only where asked for: by default a site sends its scores alone.
            counts = HISTOGRAM_METRICS if setup is _histograms else set()
            expected = EVALUATE_METRICS | PER_CLASS_METRICS | identity | personal | counts
            assert set(metrics) == expected
            assert not content.array_records
        kinds[reply.metadata.message_type] += 1
    # Deployment: hospital-x cannot train (a corrupt training image) but still evaluates.
    trained = 2 if setup is _deployed else 3
    assert kinds == {
        MessageType.TRAIN: 2 * trained,
        MessageType.EVALUATE: 6,
        "error": 6 - 2 * trained,
    }
    if setup is _personalized:  # each site did train its own part, and kept it
        for index in range(3):
            kept = LocalStore(tmp_path / f"run/sites/site-{index}/personalization/run").latest(2)
            assert kept is not None and set(kept[1]) == {"personal.ctx"}
    # The server can draw a site's reliability diagram only from the counts the site chose to send.
    assert (tmp_path / "run" / SITE_RELIABILITY_PLOT).exists() == (setup is _histograms)
