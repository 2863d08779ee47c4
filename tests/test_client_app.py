import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_messages import instruction
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    MessageType,
    RecordDict,
)
from sites_on_disk import corrupt_one_image, write_site

from fedprompt.config import compose_config
from fedprompt.federation import client_app
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.local_site import open_node_site
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.personalization.local_store import LocalStore
from fedprompt.site_rounds import backbone_for, build_learner, splits_and_plan

SHARED = Path(__file__).parents[1] / "../shared/data"


@pytest.fixture
def context():
    run_config = default_run_config("quickstart") | {"overrides": "train.local_epochs=1"}
    node_config = {"partition-id": 1, "num-partitions": 3}
    return Context(
        run_id=1, node_id=11, node_config=node_config, state=RecordDict(), run_config=run_config
    )


@pytest.fixture
def global_state(context):
    cfg = compose_config("quickstart", ["train.local_epochs=1"])
    splits, _ = splits_and_plan(cfg)
    return build_learner(cfg, backbone_for(cfg), list(splits.classnames)).trainable_state()


def test_train_reply_carries_only_the_prompt_and_scalar_metrics(context, global_state):
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}
    )
    reply = client_app.app(instruction(11, MessageType.TRAIN, content), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.array_records) == {"arrays"}
    returned = reply.content["arrays"].to_torch_state_dict()
    assert set(returned) == set(global_state)
    for key, tensor in returned.items():
        assert tensor.shape == global_state[key].shape
    assert not all(np.array_equal(returned[k], global_state[k]) for k in returned)
    metrics = dict(reply.content["metrics"])
    assert metrics["site-index"] == 1 and metrics["num-examples"] > 0
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert set(reply.content.config_records) == set()


def test_evaluate_reply_scores_the_site_test_split(context, global_state):
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}
    )
    reply = client_app.app(instruction(11, MessageType.EVALUATE, content), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not reply.content.array_records
    metrics = dict(reply.content["metrics"])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num-examples"] > 0


def test_wrong_number_of_nodes_is_reported(context, global_state):
    context.node_config["num-partitions"] = 2
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}
    )
    with pytest.raises(ValueError, match="num-supernodes=3"):
        client_app.app(instruction(11, MessageType.EVALUATE, content), context)


# Deployment: a node's site is its own data folder, named by --node-config site-config=...

DEPLOYED = default_run_config("quickstart") | {"overrides": "federation.mode=deployment"}


def _deployed_context(config, node_id=21):
    return Context(
        run_id=7,
        node_id=node_id,
        node_config={"site-config": str(config)},
        state=RecordDict(),
        run_config=DEPLOYED,
    )


def _train(context, global_state, **config):
    content = RecordDict(
        {
            "arrays": ArrayRecord(global_state),
            "config": ConfigRecord({"server-round": 1, **config}),
        }
    )
    return client_app.app(instruction(11, MessageType.TRAIN, content), context)


def test_a_deployed_site_trains_on_its_own_folder_and_logs_what_it_sent(tmp_path, global_state):
    config = write_site(tmp_path, "hospital-a", train=3, test=2)
    reply = _train(_deployed_context(config), global_state)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] == 12 and "site-index" not in metrics
    releases = json.loads((config.parent / "state/releases.json").read_text())
    assert releases["releases"] == [{"run_id": 7, "round": 1, "num_examples": 12}]
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}
    )
    evaluated = client_app.app(
        instruction(11, MessageType.EVALUATE, content), _deployed_context(config)
    )
    assert dict(evaluated.content["metrics"])["num-examples"] == 8  # every test image


def test_a_site_with_another_class_list_is_refused_with_the_reason(tmp_path, global_state):
    config = write_site(tmp_path, "hospital-a", classnames=["tumour", "normal", "other", "none"])
    reply = _train(_deployed_context(config), global_state)
    assert reply.has_error()
    assert reply.error.reason.startswith("[hospital-a] Site hospital-a lists the classes")


def test_a_corrupt_image_is_reported_without_its_file_name(tmp_path, global_state, caplog):
    config = write_site(tmp_path, "hospital-x")  # only ever used with a corrupt image
    bad = corrupt_one_image(config)
    with caplog.at_level(logging.ERROR):
        reply = _train(_deployed_context(config), global_state)
    assert reply.has_error()
    assert reply.error.reason.startswith("[hospital-x] CorruptImageError: the site's data")
    assert str(bad) not in reply.error.reason and bad.name not in reply.error.reason
    assert str(bad) in caplog.text  # the full sentence stays in the site's own log


def test_a_deployed_node_without_a_site_config_says_how_to_start_it(global_state):
    context = Context(run_id=7, node_id=21, node_config={}, state=RecordDict(), run_config=DEPLOYED)
    reply = _train(context, global_state)
    assert "start-supernode.sh" in reply.error.reason


def test_fedprox_keeps_the_site_closer_to_the_global_prompt(context, global_state):
    def distance(reply):
        state = reply.content["arrays"].to_torch_state_dict()
        return sum(float(((state[k] - global_state[k]) ** 2).sum()) for k in state)

    plain = _train(context, global_state)
    proximal = _train(context, global_state, **{"proximal-mu": 50.0})
    assert not proximal.has_error(), proximal.error.reason if proximal.has_error() else ""
    assert 0 < distance(proximal) < distance(plain)


def test_sites_with_bad_data_drop_out_and_the_federation_continues(tmp_path):
    good = [
        write_site(tmp_path, name, seed=i) for i, name in enumerate(["hospital-a", "hospital-b"])
    ]
    corrupt = write_site(tmp_path, "hospital-x", seed=2)
    corrupt_one_image(corrupt)
    stray_label = write_site(tmp_path, "hospital-y", seed=3)
    (stray_label.parent / "images/train/astrocytoma").mkdir()
    shutil.copy(
        corrupt.parent / "images/test/normal_brain/0.png",
        stray_label.parent / "images/train/astrocytoma",
    )
    empty_split = write_site(tmp_path, "hospital-z", seed=4)
    for image in (empty_split.parent / "images/train").rglob("*.png"):
        image.unlink()  # an empty test split trains (test_run_monitor); an empty train split not
    configs = [*good, corrupt, stray_label, empty_split]
    overrides = [
        "federation.mode=deployment",
        "federation.num_sites=5",
        "federation.rounds=2",
        "train.local_epochs=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    names = [c.parent.name for c in configs]
    grid = InProcessGrid(
        [{"site-config": str(c)} for c in configs],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
        names=names,
    )
    summary = run_federation(grid, compose_config("quickstart", overrides))

    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["num_trained"] == 2
        assert sorted(line["missing"]) == ["hospital-x", "hospital-y", "hospital-z"]
        assert "CorruptImageError" in line["missing"]["hospital-x"]
        assert "DataError" in line["missing"]["hospital-y"]
        assert "DatasetNotFoundError" in line["missing"]["hospital-z"]
        assert line["sites"]["hospital-a"]["train_loss"] > 0
    assert summary["mode"] == "deployment" and summary["final"]["source"] == "federated"
    assert set(summary["final"]["per_site"]) == {"hospital-a", "hospital-b", "hospital-x"}


def _personal_run(tmp_path, scheme, restart_at=None):
    """Three simulated sites for two rounds under ``scheme``; a SuperNode restart (its node state
    lost) before round ``restart_at`` if given. Returns the grid and the results folder."""
    out = tmp_path / "run"
    overrides = [f"personalization={scheme}", "federation.rounds=2", f"output_dir={out}"]
    run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}

    def restarted(msg, context):
        is_train = msg.metadata.message_type == MessageType.TRAIN
        if is_train and int(msg.content["config"]["server-round"]) == restart_at:
            context.state = RecordDict()  # a new SuperNode process: nothing in memory
        return client_app.app(msg, context)

    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = InProcessGrid(nodes, run_config, apps={i: restarted for i in range(3)})
    run_federation(grid, compose_config("quickstart", overrides))
    return grid, out


def _sent(grid, message_type):
    """The tensors each node sent, by (its k-th reply, node): nodes answer in any order."""
    sent: dict[tuple[int, int], dict] = {}
    for reply in grid.replies:
        if not reply.has_error() and reply.metadata.message_type == message_type:
            node = reply.metadata.src_node_id
            k = sum(1 for _, known in sent if known == node)
            sent[k, node] = reply.content["arrays"].to_torch_state_dict()
    return sent


def test_a_restarted_supernode_takes_its_local_part_from_its_disk(tmp_path):
    straight_grid, straight = _personal_run(tmp_path / "a", "promptfolio")
    restarted_grid, restarted = _personal_run(tmp_path / "b", "promptfolio", restart_at=2)
    assert restarted_grid.contexts[101].state.array_records  # kept again after the restart
    for site in range(3):
        ours = LocalStore(restarted / f"sites/site-{site}/personalization/run").latest(2)[1]
        theirs = LocalStore(straight / f"sites/site-{site}/personalization/run").latest(2)[1]
        assert torch.equal(ours["personal.ctx"], theirs["personal.ctx"])
    ours, theirs = _sent(restarted_grid, MessageType.TRAIN), _sent(straight_grid, MessageType.TRAIN)
    assert ours.keys() == theirs.keys() and len(ours) == 6
    assert all(torch.equal(ours[key]["ctx"], theirs[key]["ctx"]) for key in ours)
    assert (
        json.loads((restarted / "summary.json").read_text())["final"]
        == json.loads((straight / "summary.json").read_text())["final"]
    )


def test_the_newest_local_part_wins_between_node_state_and_disk(tmp_path, context):
    cfg = compose_config("quickstart", [f"output_dir={tmp_path}"])
    site = open_node_site(cfg, context.node_config)
    assert client_app.local_state(site, context, 5) is None
    client_app.keep_local_state(site, context, 2, {"personal.ctx": torch.full((2,), 2.0)})
    site.local_store(context.run_id).save(3, {"personal.ctx": torch.full((2,), 3.0)})
    assert float(client_app.local_state(site, context, 5)["personal.ctx"][0]) == 3.0  # disk
    assert float(client_app.local_state(site, context, 2)["personal.ctx"][0]) == 2.0
    client_app.keep_local_state(site, context, 4, {"personal.ctx": torch.full((2,), 4.0)})
    site.local_store(context.run_id).directory.joinpath("round-4.safetensors").unlink()
    assert float(client_app.local_state(site, context, 5)["personal.ctx"][0]) == 4.0  # memory
    assert client_app.local_state(site, context, 1) is None


def test_local_only_sends_back_the_global_prompt_it_received(tmp_path):
    grid, out = _personal_run(tmp_path, "local_only")
    cfg = compose_config("quickstart", [])
    initial = build_learner(cfg, backbone_for(cfg), list(cfg.dataset.classnames)).trainable_state()
    sent = _sent(grid, MessageType.TRAIN)
    assert len(sent) == 6
    for (k, _), state in sent.items():
        if k == 0:  # round 1: each site returns exactly the initial prompt it received
            assert torch.equal(state["ctx"], initial["ctx"])
        # Averaging equal prompts moves them by rounding only.
        torch.testing.assert_close(state["ctx"], initial["ctx"], rtol=0, atol=1e-6)
    final = torch.load(out / "global_state.pt")["ctx"]
    torch.testing.assert_close(final, initial["ctx"], rtol=0, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    per_site = summary["final"]["per_site"]
    total = sum(site["num_test"] for site in per_site.values())
    weighted = sum(s["personalized_accuracy"] * s["num_test"] for s in per_site.values()) / total
    assert summary["final"]["personalized_accuracy"] == pytest.approx(weighted)
    kept = LocalStore(out / "sites/site-0/personalization/run").latest(2)[1]
    assert set(kept) == {"ctx"} and not torch.equal(kept["ctx"], initial["ctx"])


def test_finetune_scores_a_fine_tuned_copy_and_keeps_nothing(tmp_path):
    grid, out = _personal_run(tmp_path, "finetune")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["personalization"] == {"name": "finetune", "local_epochs": 2}
    assert summary["final"]["personalized_accuracy"] is not None
    assert not (out / "sites/site-0/personalization").exists()
    assert not any(ctx.state.array_records for ctx in grid.contexts.values())


def test_fedotp_trains_on_patch_tokens_and_scores_its_own_prompt(tmp_path):
    grid, out = _personal_run(tmp_path, "fedotp")
    assert all(set(state) == {"ctx"} for state in _sent(grid, MessageType.TRAIN).values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["personalization"]["name"] == "fedotp"
    assert all(
        0.0 <= site["personalized_accuracy"] <= 1.0
        for site in summary["final"]["per_site"].values()
    )
    kept = LocalStore(out / "sites/site-1/personalization/run").latest(2)[1]
    assert set(kept) == {"personal.ctx"}
