"""Update validation: each malformed reply is rejected with a reason naming its site, and the
round aggregates the others (hand-made replies, hand-computed aggregates)."""

import json
import logging
import re

import numpy as np
import pytest
from flower_messages import instruction, server_task_identity
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from fedprompt.config import compose_config
from fedprompt.federation.client_app import app
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config
from fedprompt.federation.validation import UpdateValidation

SHAPE = (2, 3)
REFERENCE = ArrayRecord({"ctx": Array(np.zeros(SHAPE, np.float32))})


def train_reply(node, value=1.0, num_examples=10, arrays=None, **metrics) -> Message:
    """A site's train reply: ``ctx`` filled with ``value`` unless ``arrays`` says otherwise."""
    arrays = arrays if arrays is not None else {"ctx": np.full(SHAPE, value, np.float32)}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5, **metrics}),
        }
    )
    return Message(content, reply_to=instruction(node, MessageType.TRAIN))


def evaluate_reply(node, accuracy=0.5, num_examples=10, **extra) -> Message:
    metrics = MetricRecord({"num-examples": num_examples, "accuracy": accuracy, **extra})
    return Message(
        RecordDict({"metrics": metrics}), reply_to=instruction(node, MessageType.EVALUATE)
    )


def _validator(rejections, **settings):
    return UpdateValidation(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
        REFERENCE,
        max_update_ratio=10.0,
        site_name=lambda node: f"hospital-{node}",
        on_reject=lambda *args: rejections.append(args),
        **settings,
    )


def _two_records(node):
    reply = train_reply(node)
    reply.content["more"] = ArrayRecord({"ctx": Array(np.ones(SHAPE, np.float32))})
    return reply


BAD_REPLIES = {
    "two array records": (_two_records, "2 array records"),
    "other keys": (
        lambda n: train_reply(n, arrays={"ctx": np.ones(SHAPE, np.float32), "w": np.ones(1)}),
        "tensors are \\['ctx', 'w'\\]",
    ),
    "other shape": (
        lambda n: train_reply(n, arrays={"ctx": np.ones((3, 2), np.float32)}),
        "is float32 \\(3, 2\\), expected float32 \\(2, 3\\)",
    ),
    "other dtype": (
        lambda n: train_reply(n, arrays={"ctx": np.ones(SHAPE, np.float64)}),
        "is float64 \\(2, 3\\), expected float32",
    ),
    "NaN": (lambda n: train_reply(n, value=np.nan), "NaN or Inf"),
    "Inf": (lambda n: train_reply(n, value=np.inf), "NaN or Inf"),
    "huge update": (lambda n: train_reply(n, value=1000.0), "update norm 2449 is above 10"),
    "no examples": (lambda n: train_reply(n, num_examples=0), "not a positive number"),
    "NaN metric": (lambda n: train_reply(n, **{"train-loss": float("nan")}), "not a finite"),
    "other metrics": (lambda n: train_reply(n, extra=1.0), "metrics are"),
}


@pytest.mark.parametrize("fault", list(BAD_REPLIES))
def test_a_bad_update_is_rejected_and_the_round_proceeds(fault, caplog):
    make_bad, reason = BAD_REPLIES[fault]
    rejections = []
    good = [train_reply(2, value=1.0, num_examples=10), train_reply(3, value=2.0, num_examples=30)]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = _validator(rejections).aggregate_train(4, [*good, make_bad(9)])
    # (10 * 1.0 + 30 * 2.0) / 40, the two good sites' weighted mean
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full(SHAPE, 1.75, np.float32))
    assert metrics["train-loss"] == pytest.approx(0.5)
    assert len(rejections) == 1
    node, message_type, why = rejections[0]
    assert node == 9 and message_type == MessageType.TRAIN
    assert re.search(reason, why), why
    assert "round 4: rejected the update of hospital-9" in caplog.text


def test_the_norm_test_is_relative_to_the_other_sites():
    rejections = []
    replies = [train_reply(2, 1.0), train_reply(3, 2.0), train_reply(4, 14.0)]
    arrays, _ = _validator(rejections).aggregate_train(1, replies)
    assert rejections == []  # 14 is below 10 x the median of 1 and 2 (times sqrt 6 each)
    np.testing.assert_allclose(arrays["ctx"].numpy(), (1.0 + 2.0 + 14.0) / 3)


def test_updates_are_measured_from_the_prompt_that_was_sent():
    rejections = []
    validator = _validator(rejections)
    sent = ArrayRecord({"ctx": Array(np.full(SHAPE, 100.0, np.float32))})

    class Grid:
        def get_node_ids(self):
            return [2, 3, 4]

    with server_task_identity():  # as a ServerApp process has it
        validator.configure_train(1, sent, ConfigRecord(), Grid())
    # Near the sent prompt: small updates, except node 4's, which went back to 0.
    replies = [train_reply(2, 100.5), train_reply(3, 101.0), train_reply(4, 0.0)]
    arrays, _ = validator.aggregate_train(1, replies)
    assert [r[0] for r in rejections] == [4]
    np.testing.assert_allclose(arrays["ctx"].numpy(), 100.75)


def test_the_aggregate_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(0)
    values = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(5)]
    weights = [3, 7, 11, 13, 17]

    def aggregate(order):
        replies = [
            train_reply(node, arrays={"ctx": values[node]}, num_examples=weights[node])
            for node in order
        ]
        return _validator([]).aggregate_train(1, replies)[0]["ctx"].numpy()

    first = aggregate([0, 1, 2, 3, 4])
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        assert np.array_equal(aggregate(order), first)  # bit for bit


def test_failed_sites_pass_through_and_all_rejected_means_no_aggregate():
    rejections = []
    failed = Message(
        Error(code=2, reason="[hospital-5] gone"), reply_to=instruction(5, MessageType.TRAIN)
    )
    arrays, metrics = _validator(rejections).aggregate_train(
        1, [failed, train_reply(2, value=np.nan)]
    )
    assert arrays is None and metrics is None
    assert [r[0] for r in rejections] == [2]


def test_bad_evaluation_replies_are_rejected():
    rejections = []
    with_tensors = evaluate_reply(4)
    with_tensors.content["arrays"] = ArrayRecord({"ctx": Array(np.ones(SHAPE, np.float32))})
    replies = [
        evaluate_reply(2, accuracy=0.5, num_examples=10),
        evaluate_reply(3, accuracy=1.0, num_examples=30),
        evaluate_reply(5, accuracy=float("inf")),
        with_tensors,
    ]
    metrics = _validator(rejections).aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert sorted(r[0] for r in rejections) == [4, 5]
    assert all(r[1] == MessageType.EVALUATE for r in rejections)


def test_an_evaluation_without_test_images_is_neither_rejected_nor_averaged(caplog):
    rejections = []
    untested = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 0})}),
        reply_to=instruction(4, MessageType.EVALUATE),
    )
    validator = _validator(rejections)
    with caplog.at_level(logging.INFO):
        metrics = validator.aggregate_evaluate(
            1, [evaluate_reply(2, 0.5, 10), untested, evaluate_reply(3, 1.0, 30)]
        )
    assert rejections == []
    assert metrics["accuracy"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert "hospital-4 holds no test images" in caplog.text
    # Alone it leaves nothing to average, rather than dividing by a total weight of 0.
    assert validator.aggregate_evaluate(2, [untested]) is None and rejections == []
    # A training reply without images is still refused.
    validator.aggregate_train(3, [train_reply(5, num_examples=0)])
    assert [r[0] for r in rejections] == [5]


def _bins(count=1, right=1):
    """A site's shared reliability bins: ``count`` images in bin 14, ``right`` of them right."""
    values = {f"reliability-{kind}-{b}": 0 for kind in ("count", "correct") for b in range(15)}
    return values | {"reliability-count-14": count, "reliability-correct-14": right}


def test_per_class_values_may_differ_by_site_and_stay_out_of_the_average():
    rejections = []
    # hospital-2's test set holds class 0 only, hospital-3's both classes.
    only_zero = {"sensitivity-0": 0.5, "specificity-1": 0.5}
    both = {"sensitivity-0": 1.0, "sensitivity-1": 0.5, "specificity-0": 0.5, "specificity-1": 1.0}
    validator = _validator(rejections, num_classes=lambda site: 2)
    metrics = validator.aggregate_evaluate(
        1, [evaluate_reply(2, 0.5, 10, **only_zero), evaluate_reply(3, 1.0, 30, **both)]
    )
    assert rejections == []
    # Flower averages what every site sends alike; a site's per-class values are its own.
    assert set(metrics) == {"accuracy"}
    assert metrics["accuracy"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)


BAD_DETAILS = {
    "a class beyond the site's": ({"sensitivity-2": 0.5}, "names a class beyond the site's 2"),
    "not a fraction": ({"specificity-0": 1.5}, "not a fraction"),
    "bins not asked for": (_bins(), "which this run did not ask for"),
}


@pytest.mark.parametrize("fault", list(BAD_DETAILS))
def test_malformed_or_unasked_per_class_values_and_bins_are_rejected(fault):
    extra, reason = BAD_DETAILS[fault]
    rejections = []
    validator = _validator(rejections, num_classes=lambda site: 2)
    metrics = validator.aggregate_evaluate(
        1, [evaluate_reply(2, 0.5, 10), evaluate_reply(3, 1.0, 30, **extra)]
    )
    assert [r[0] for r in rejections] == [3] and re.search(reason, rejections[0][2])
    assert metrics["accuracy"] == 0.5


def test_bins_are_accepted_only_where_asked_for_and_whole():
    rejections = []
    validator = _validator(rejections, share_histograms=True)
    bad = {
        4: _bins(count=1, right=2),  # more right than in the bin
        5: _bins(count=1.5, right=1),  # not a count
        6: {k: v for k, v in _bins().items() if k != "reliability-count-3"},  # a bin missing
    }
    replies = [evaluate_reply(2, 0.5, 10, **_bins()), evaluate_reply(3, 1.0, 30, **_bins(3, 0))]
    replies += [evaluate_reply(node, 1.0, 10, **bins) for node, bins in bad.items()]
    metrics = validator.aggregate_evaluate(1, replies)
    assert sorted(r[0] for r in rejections) == [4, 5, 6]
    assert "bin 14 counts 2 right of 1" in rejections[0][2]
    assert set(metrics) == {"accuracy"}  # the bins are recorded per site, not averaged


def test_a_site_that_sends_garbage_is_rejected_every_round_and_the_run_completes(tmp_path):
    def garbage(message, context):
        reply = app(message, context)
        if message.metadata.message_type == MessageType.TRAIN:
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord(
                {key: Array(np.full(a.shape, np.nan, np.float32)) for key, a in arrays.items()}
            )
        return reply

    overrides = ["federation.rounds=2", "train.local_epochs=1", f"output_dir={tmp_path}"]
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": 3} for i in range(3)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
        apps={1: garbage},
    )
    summary = run_federation(grid, compose_config("quickstart", overrides))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The record lists exactly the replies that were aggregated, with the counts they sent.
    sent = {
        f"site-{r.metadata.src_node_id - 101}": r.content["metrics"]["num-examples"]
        for r in grid.replies
        if r.metadata.message_type == MessageType.TRAIN and r.metadata.src_node_id != 102
    }
    for line in lines:
        assert line["aggregated"] == sent
        assert list(line["rejected"]) == ["site-1"]
        assert "holds NaN or Inf" in line["rejected"]["site-1"]
        assert line["num_trained"] == 2 and line["missing"] == {}
        assert line["sites"]["site-1"]["train_loss"] is None  # its numbers are not counted
    assert np.isfinite(summary["final"]["accuracy"])


def test_under_secagg_one_rejected_reply_discards_the_whole_sum():
    rejections, aggregated = [], []
    validation = UpdateValidation(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
        REFERENCE,
        site_name=lambda node: f"hospital-{node}",
        on_reject=lambda *args: rejections.append(args),
        on_aggregate=lambda node, count: aggregated.append((node, count)),
        secure_sum=True,
    )
    # Every reply carries the same secure sum; site 3's metrics are unusable.
    replies = [train_reply(1), train_reply(2), train_reply(3, **{"train-loss": float("nan")})]
    arrays, _ = validation.aggregate_train(1, replies)
    assert arrays is None and aggregated == []
    assert sorted(node for node, _, _ in rejections) == [1, 2, 3]
    assert "includes a rejected reply" in rejections[0][2] + rejections[1][2]

    rejections.clear()
    arrays, _ = validation.aggregate_train(2, [train_reply(1, 3.0), train_reply(2, 3.0)])
    assert rejections == [] and aggregated == [(1, 10), (2, 10)]
    np.testing.assert_allclose(arrays["ctx"].numpy(), 3.0)


def _held_out_reply(node):
    metrics = MetricRecord({"num-examples": 0, "held-out": 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=instruction(node, MessageType.TRAIN))


def test_a_held_out_site_is_left_out_and_the_claim_from_another_site_rejected():
    rejections, withheld = [], []
    validator = UpdateValidation(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
        REFERENCE,
        site_name=lambda node: f"hospital-{node}",
        on_reject=lambda *args: rejections.append(args),
        on_withhold=lambda *args: withheld.append(args),
        held_out=["hospital-9"],
    )
    good = [train_reply(2, value=1.0, num_examples=10), train_reply(3, value=2.0, num_examples=30)]
    arrays, _ = validator.aggregate_train(1, [*good, _held_out_reply(9), _held_out_reply(4)])
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full(SHAPE, 1.75, np.float32))
    assert [node for node, _ in withheld] == [9] and "held out" in withheld[0][1]
    assert [(node, why) for node, _, why in rejections] == [
        (4, "it says it is held out of training, but it is not one of the evaluation.holdout_sites")
    ]


@pytest.mark.parametrize("personalization", ["none", "promptfolio"])
def test_held_out_sites_never_train_and_score_the_global_prompt(tmp_path, personalization):
    overrides = [
        "federation.num_sites=4",
        "evaluation.holdout_sites=1",
        "federation.rounds=2",
        f"personalization={personalization}",
        f"output_dir={tmp_path}",
    ]
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": 4} for i in range(4)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
    )
    summary = run_federation(grid, compose_config("quickstart", overrides))
    held = [r for r in grid.replies if r.metadata.src_node_id == 104]  # site-3
    train = [r for r in held if r.metadata.message_type == MessageType.TRAIN]
    assert len(train) == 2 and all(not r.content.array_records for r in train)
    assert all(
        dict(r.content["metrics"]) == {"num-examples": 0, "site-index": 3, "held-out": 1}
        for r in train
    )
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert "site-3" not in line["aggregated"] and line["num_trained"] == 3
        assert line["held_out"] == ["site-3"] and line["rejected"] == {}
        assert line["unseen_site_accuracy"] == line["sites"]["site-3"]["accuracy"] is not None
        assert line["sites"]["site-3"]["personalized_accuracy"] is None  # it has no own prompt
    final = summary["final"]
    assert final["per_site"]["site-3"]["held_out"] is True
    assert final["unseen_site_accuracy"] == final["per_site"]["site-3"]["accuracy"]
    trained = [s for name, s in final["per_site"].items() if name != "site-3"]
    weighted = sum(s["accuracy"] * s["num_test"] for s in trained) / sum(
        s["num_test"] for s in trained
    )
    assert final["federated_accuracy"] == pytest.approx(weighted)
