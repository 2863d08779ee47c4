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
from fedprompt.federation.validation import UpdateValidation, metrics_problem

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
    assert withheld == [(9, "held out: an unseen site, it only evaluates")]
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


# The refusals are contracts: each is one sentence naming the key, the value and the expectation.
EXACT_REASONS = {
    "no array record": (
        lambda n: Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5})}),
            reply_to=instruction(n, MessageType.TRAIN),
        ),
        "it carries 0 array records where a train reply carries one",
    ),
    "two array records": (
        _two_records,
        "it carries 2 array records where a train reply carries one",
    ),
    "other keys": (
        BAD_REPLIES["other keys"][0],
        "its tensors are ['ctx', 'w'] but the global prompt's are ['ctx']",
    ),
    "other shape": (
        BAD_REPLIES["other shape"][0],
        "tensor 'ctx' is float32 (3, 2), expected float32 (2, 3)",
    ),
    "other dtype": (
        BAD_REPLIES["other dtype"][0],
        "tensor 'ctx' is float64 (2, 3), expected float32 (2, 3)",
    ),
    "Inf": (BAD_REPLIES["Inf"][0], "tensor 'ctx' holds NaN or Inf"),
    # The others' norms are sqrt(6) and 2 sqrt(6): their median is 1.5 sqrt(6).
    "huge update": (
        BAD_REPLIES["huge update"][0],
        "its update norm 2449 is above 10 x the other sites' median (3.674)",
    ),
    "no examples": (
        BAD_REPLIES["no examples"][0],
        "its 'num-examples' is 0, not a positive number",
    ),
    "no weight": (
        lambda n: Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"ctx": Array(np.ones(SHAPE, np.float32))}),
                    "metrics": MetricRecord({"train-loss": 0.5}),
                }
            ),
            reply_to=instruction(n, MessageType.TRAIN),
        ),
        "its 'num-examples' is None, not a positive number",
    ),
    "a list for a weight": (
        lambda n: train_reply(n, num_examples=[5, 5]),
        "its 'num-examples' is [5, 5], not a positive number",
    ),
    "NaN metric": (
        BAD_REPLIES["NaN metric"][0],
        "its metric 'train-loss' is nan, not a finite number",
    ),
    "other metrics": (
        BAD_REPLIES["other metrics"][0],
        "its metrics are ['extra', 'num-examples', 'train-loss'] but the other sites' are "
        "['num-examples', 'train-loss']",
    ),
}


@pytest.mark.parametrize("fault", list(EXACT_REASONS))
def test_each_refusal_of_an_update_is_one_exact_sentence_logged_with_the_site(fault, caplog):
    make_bad, reason = EXACT_REASONS[fault]
    rejections = []
    good = [train_reply(2, value=1.0, num_examples=10), train_reply(3, value=2.0, num_examples=30)]
    with caplog.at_level(logging.WARNING):
        arrays, _ = _validator(rejections).aggregate_train(4, [make_bad(9), *good])
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full(SHAPE, 1.75, np.float32))
    assert rejections == [(9, MessageType.TRAIN, reason)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"[fedprompt] round 4: rejected the update of hospital-9: {reason}"
    ]


def test_a_rejected_evaluation_is_logged_as_an_evaluation(caplog):
    rejections = []
    replies = [evaluate_reply(2), evaluate_reply(3, accuracy=float("nan"))]
    with caplog.at_level(logging.WARNING):
        metrics = _validator(rejections).aggregate_evaluate(7, replies)
    reason = "its metric 'accuracy' is nan, not a finite number"
    assert rejections == [(3, MessageType.EVALUATE, reason)]
    assert metrics["accuracy"] == 0.5
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"[fedprompt] round 7: rejected the evaluation of hospital-3: {reason}"
    ]


def _evaluation(node, metrics, extra_records=()):
    content = RecordDict({"metrics": MetricRecord(metrics)})
    for name in extra_records:
        content[name] = MetricRecord(metrics)
    return Message(content, reply_to=instruction(node, MessageType.EVALUATE))


EXACT_EVALUATION_REASONS = {
    "a negative count": (
        _evaluation(9, {"num-examples": -1, "accuracy": 0.5}),
        "its 'num-examples' is -1, not a positive number",
    ),
    "no count": (
        _evaluation(9, {"accuracy": 0.5}),
        "its 'num-examples' is None, not a positive number",
    ),
    "no count and no images, in two records": (
        _evaluation(9, {"num-examples": 0}, extra_records=["more"]),
        "it carries 2 metric records where a reply carries exactly one",
    ),
    "no metric record": (
        Message(RecordDict(), reply_to=instruction(9, MessageType.EVALUATE)),
        "it carries 0 metric records where a reply carries exactly one",
    ),
    "tensors": (
        Message(
            RecordDict(
                {
                    "metrics": MetricRecord({"num-examples": 10, "accuracy": 0.5}),
                    "arrays": ArrayRecord({"ctx": Array(np.ones(SHAPE, np.float32))}),
                }
            ),
            reply_to=instruction(9, MessageType.EVALUATE),
        ),
        "an evaluation reply carries tensors; it must carry metrics only",
    ),
}


@pytest.mark.parametrize("fault", list(EXACT_EVALUATION_REASONS))
def test_each_refusal_of_an_evaluation_is_one_exact_sentence(fault):
    bad, reason = EXACT_EVALUATION_REASONS[fault]
    rejections = []
    metrics = _validator(rejections).aggregate_evaluate(1, [evaluate_reply(2, 0.25), bad])
    assert rejections == [(9, MessageType.EVALUATE, reason)]
    assert metrics["accuracy"] == 0.25


def _flat_validator(rejections, **settings):
    """A validator of a 4-value prompt of zeros: an update of ``v`` everywhere has norm 2 v."""
    return UpdateValidation(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
        ArrayRecord({"ctx": Array(np.zeros(4, np.float32))}),
        on_reject=lambda *args: rejections.append(args),
        **settings,
    )


def _flat_reply(node, value):
    return train_reply(node, arrays={"ctx": np.full(4, value, np.float32)})


def test_an_update_exactly_at_the_limit_is_kept_and_one_just_above_it_rejected(caplog):
    # Default ratio 10: the others' median norm is 2, so the limit is 20, the norm of 10s.
    rejections = []
    replies = [_flat_reply(2, 1.0), _flat_reply(3, 1.0), _flat_reply(4, 10.0)]
    arrays, _ = _flat_validator(rejections).aggregate_train(1, replies)
    assert rejections == []
    np.testing.assert_allclose(arrays["ctx"].numpy(), 4.0)
    replies = [_flat_reply(2, 1.0), _flat_reply(3, 1.0), _flat_reply(4, 10.25)]
    with caplog.at_level(logging.WARNING):
        _flat_validator(rejections).aggregate_train(1, replies)
    assert rejections == [
        (4, MessageType.TRAIN, "its update norm 20.5 is above 10 x the other sites' median (2)")
    ]
    # Without a site_name, a site is named by its node id.
    assert "rejected the update of node-4: its update norm 20.5" in caplog.text


def test_the_ratio_is_the_configured_one():
    rejections = []
    replies = [_flat_reply(2, 1.0), _flat_reply(3, 1.0), _flat_reply(4, 2.5)]
    _flat_validator(rejections, max_update_ratio=2.0).aggregate_train(1, replies)
    assert rejections == [
        (4, MessageType.TRAIN, "its update norm 5 is above 2 x the other sites' median (2)")
    ]


def test_the_norm_is_summed_over_every_tensor_in_double_precision():
    reference = ArrayRecord(
        {"a": Array(np.zeros(4, np.float32)), "b": Array(np.zeros(4, np.float32))}
    )
    rejections = []
    validator = UpdateValidation(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
        reference,
        max_update_ratio=1.0,
        on_reject=lambda *args: rejections.append(args),
    )

    def reply(node, a, b):
        arrays = {"a": np.full(4, a, np.float32), "b": np.full(4, b, np.float32)}
        return train_reply(node, arrays=arrays)

    # Three norms of 10 (sqrt(4 * 9 + 4 * 16), sqrt(4 * 25), sqrt(4 * 25)), each at 1 x the
    # others' median only if both tensors count; float32 squares of 3e19 would overflow to inf.
    replies = [reply(2, 3.0, 4.0), reply(3, 0.0, 5.0), reply(4, 5.0, 0.0), reply(5, 3e19, 4e19)]
    validator.aggregate_train(1, replies)
    assert rejections == [
        (5, MessageType.TRAIN, "its update norm 1e+20 is above 1 x the other sites' median (10)")
    ]


def test_a_site_that_moved_when_every_other_site_stood_still_is_rejected():
    # The others' median norm is 0; the limit is then 10 x 1e-12, not 0 (which would also
    # reject a site that stood still) nor anything a real update stays under.
    rejections = []
    replies = [_flat_reply(2, 0.0), _flat_reply(3, 0.0), _flat_reply(4, 1e-6)]
    _flat_validator(rejections).aggregate_train(1, replies)
    assert [(node, why) for node, _, why in rejections] == [
        (4, "its update norm 2e-06 is above 10 x the other sites' median (0)")
    ]
    rejections.clear()
    replies = [_flat_reply(2, 0.0), _flat_reply(3, 0.0), _flat_reply(4, 0.0)]
    _flat_validator(rejections).aggregate_train(1, replies)
    assert rejections == []


def test_a_lone_update_has_no_others_to_be_measured_against():
    rejections = []
    arrays, _ = _flat_validator(rejections).aggregate_train(1, [_flat_reply(2, 1e6)])
    assert rejections == []
    np.testing.assert_allclose(arrays["ctx"].numpy(), 1e6)


def test_when_metric_sets_tie_the_first_site_in_site_order_sets_the_usual_ones():
    rejections = []
    replies = [train_reply(3, extra=1.0), train_reply(2, other=1.0)]  # arrival order 3, 2
    _, metrics = _validator(rejections).aggregate_train(1, replies)
    assert rejections == [
        (
            3,
            MessageType.TRAIN,
            "its metrics are ['extra', 'num-examples', 'train-loss'] but the other sites' are "
            "['num-examples', 'other', 'train-loss']",
        )
    ]
    assert set(metrics) == {"other", "train-loss"}  # FedAvg drops the weight from its means


def _recorded(calls, name):
    """A strategy method that records its arguments and returns a marker."""

    def method(*args):
        calls.append((name, *args))
        return [name]

    return method


class _Recorder(FedAvg):
    """FedAvg that records how it is configured and summarized."""

    def __init__(self):
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.calls = []
        self.configure_train = _recorded(self.calls, "configure_train")
        self.configure_evaluate = _recorded(self.calls, "configure_evaluate")
        self.summary = _recorded(self.calls, "summary")


def test_configuring_a_round_is_delegated_as_it_came():
    inner = _Recorder()
    validator = UpdateValidation(inner, REFERENCE)
    sent = ArrayRecord({"ctx": Array(np.full(SHAPE, 3.0, np.float32))})
    config, grid = ConfigRecord({"lr": 0.1}), object()
    assert validator.configure_train(5, sent, config, grid) == ["configure_train"]
    assert validator.configure_evaluate(5, sent, config, grid) == ["configure_evaluate"]
    assert inner.calls == [
        ("configure_train", 5, sent, config, grid),
        ("configure_evaluate", 5, sent, config, grid),
    ]


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        ({}, "\t│\t└── update norm at most 10.0 x the other sites' median"),
        ({"max_update_ratio": 3.5}, "\t│\t└── update norm at most 3.5 x the other sites' median"),
        (
            {"secure_sum": True},
            "\t│\t└── SecAgg+: checks apply to the sum; per-site norms are hidden",
        ),
    ],
)
def test_the_summary_names_the_checks_then_the_wrapped_strategys(settings, line, caplog):
    inner = _Recorder()
    with caplog.at_level(logging.INFO):
        UpdateValidation(inner, REFERENCE, **settings).summary()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "\t├──> Update validation: keys, shapes, dtypes, finite values, metrics;"),
        (logging.INFO, line),
    ]
    assert inner.calls == [("summary",)]


def test_a_site_whose_budget_is_spent_is_left_out_with_its_epsilon(caplog):
    rejections, withheld, aggregated = [], [], []
    validator = _validator(
        rejections,
        on_withhold=lambda *args: withheld.append(args),
        on_aggregate=lambda *args: aggregated.append(args),
    )
    spent = {"dp-budget-exhausted": 1, "dp-epsilon": 2.71828}
    replies = [
        train_reply(2, 1.0, 10, **{"dp-budget-exhausted": 0, "dp-epsilon": 1.0}),
        train_reply(3, 2.0, 30, **{"dp-budget-exhausted": 0, "dp-epsilon": 1.0}),
        train_reply(4, 0.0, 10, **spent),
    ]
    with caplog.at_level(logging.INFO):
        arrays, _ = validator.aggregate_train(6, replies)
    np.testing.assert_allclose(arrays["ctx"].numpy(), 1.75)
    reason = "privacy budget spent (epsilon 2.718); the site trains no more"
    assert rejections == [] and withheld == [(4, reason)]
    assert aggregated == [(2, 10), (3, 30)]
    assert f"[fedprompt] round 6: hospital-4 is left out of the aggregate: {reason}" in [
        r.getMessage() for r in caplog.records
    ]


def test_a_spent_budget_without_an_epsilon_is_still_left_out():
    withheld = []
    validator = _validator([], on_withhold=lambda *args: withheld.append(args))
    replies = [
        train_reply(2, 1.0, **{"dp-budget-exhausted": 0}),
        train_reply(4, 0.0, **{"dp-budget-exhausted": 1}),
    ]
    arrays, _ = validator.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["ctx"].numpy(), 1.0)
    assert withheld == [(4, "privacy budget spent (epsilon nan); the site trains no more")]


def test_under_secagg_a_site_that_failed_does_not_discard_the_sum():
    rejections = []
    failed = Message(
        Error(code=2, reason="[hospital-5] gone"), reply_to=instruction(5, MessageType.TRAIN)
    )
    validator = _validator(rejections, secure_sum=True)
    arrays, _ = validator.aggregate_train(1, [train_reply(1, 3.0), failed, train_reply(2, 3.0)])
    assert rejections == []
    np.testing.assert_allclose(arrays["ctx"].numpy(), 3.0)


def test_the_aggregated_weights_are_reported_in_site_order():
    aggregated = []
    validator = _validator([], on_aggregate=lambda *args: aggregated.append(args))
    replies = [train_reply(3, 2.0, 30), train_reply(2, 1.0, 10)]
    validator.aggregate_train(1, replies)
    assert aggregated == [(2, 10), (3, 30)]


def test_an_evaluation_with_images_held_by_a_held_out_site_is_recorded_not_averaged():
    rejections = []
    validator = _validator(rejections, held_out=["hospital-9"])
    replies = [evaluate_reply(2, 0.5, 10), evaluate_reply(9, 1.0, 30), evaluate_reply(3, 0.25, 10)]
    metrics = validator.aggregate_evaluate(1, replies)
    assert rejections == []
    assert metrics["accuracy"] == pytest.approx(0.375)


def test_a_float_zero_count_means_no_test_images_and_weights_by_the_configured_key():
    rejections = []
    validator = _validator(rejections)
    untested = _evaluation(4, {"num-examples": 0.0})
    metrics = validator.aggregate_evaluate(1, [evaluate_reply(2, 0.5, 10), untested])
    assert rejections == [] and metrics["accuracy"] == 0.5
    # Weighted by another key, a zero count is just a count: the weight must be positive.
    weighted = UpdateValidation(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, weighted_by_key="images"),
        REFERENCE,
        site_name=lambda node: f"hospital-{node}",
        on_reject=lambda *args: rejections.append(args),
        weighted_by_key="images",
    )
    replies = [_evaluation(2, {"images": 10, "accuracy": 0.5}), _evaluation(3, {"images": 0})]
    weighted.aggregate_evaluate(1, replies)
    assert rejections == [(3, MessageType.EVALUATE, "its 'images' is 0, not a positive number")]


def test_failed_evaluations_pass_through_to_the_strategy():
    failed = Message(
        Error(code=2, reason="[hospital-5] gone"), reply_to=instruction(5, MessageType.EVALUATE)
    )
    rejections = []
    metrics = _validator(rejections).aggregate_evaluate(1, [failed, evaluate_reply(2, 0.5, 10)])
    assert rejections == [] and metrics["accuracy"] == 0.5


def test_a_weight_of_zero_passes_only_where_allowed():
    def problem(weight, allow_zero):
        reply = _evaluation(2, {"num-examples": weight, "accuracy": 0.5})
        return metrics_problem(reply, "num-examples", allow_zero=allow_zero)

    assert problem(0, allow_zero=True) is None
    assert problem(0, allow_zero=False) == "its 'num-examples' is 0, not a positive number"
    assert problem(-1, allow_zero=True) == "its 'num-examples' is -1, not a non-negative number"
    assert problem(float("inf"), allow_zero=True) == (
        "its 'num-examples' is inf, not a non-negative number"
    )
    assert problem(1, allow_zero=False) is None


def test_per_class_ids_are_checked_against_each_sites_own_class_list():
    rejections = []
    classes = {"hospital-2": 2, "hospital-3": 3}
    validator = _validator(rejections, num_classes=lambda site: classes[site])
    third = {"sensitivity-2": 0.5}
    replies = [evaluate_reply(2, 0.5, 10, **third), evaluate_reply(3, 1.0, 30, **third)]
    metrics = validator.aggregate_evaluate(1, replies)
    assert [node for node, _, _ in rejections] == [2]
    assert metrics["accuracy"] == 1.0


def test_an_evaluation_without_test_images_is_logged_in_one_line(caplog):
    untested = _evaluation(4, {"num-examples": 0})
    with caplog.at_level(logging.INFO):
        _validator([]).aggregate_evaluate(3, [evaluate_reply(2), untested])
    assert (
        "[fedprompt] round 3: hospital-4 holds no test images; its evaluation is recorded, "
        "not averaged"
    ) in [r.getMessage() for r in caplog.records]


def test_an_evaluation_with_other_metrics_is_rejected_in_its_round(caplog):
    rejections = []
    replies = [evaluate_reply(2), evaluate_reply(3), evaluate_reply(4, extra=1.0)]
    with caplog.at_level(logging.WARNING):
        metrics = _validator(rejections).aggregate_evaluate(7, replies)
    reason = (
        "its metrics are ['accuracy', 'extra', 'num-examples'] but the other sites' are "
        "['accuracy', 'num-examples']"
    )
    assert rejections == [(4, MessageType.EVALUATE, reason)]
    assert set(metrics) == {"accuracy"}
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"[fedprompt] round 7: rejected the evaluation of hospital-4: {reason}"
    ]


class _Aggregator(FedAvg):
    """FedAvg that records the round and the senders of what it is asked to aggregate."""

    def __init__(self):
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.calls = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.calls.append(("train", server_round, [r.metadata.src_node_id for r in replies]))
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        self.calls.append(("evaluate", server_round, [r.metadata.src_node_id for r in replies]))
        return super().aggregate_evaluate(server_round, replies)


def test_the_wrapped_strategy_gets_the_round_and_the_kept_replies_in_site_order_then_failures():
    inner = _Aggregator()
    validator = UpdateValidation(inner, REFERENCE, site_name=lambda node: f"hospital-{node}")

    def failed(node, kind):
        return Message(Error(code=2, reason="gone"), reply_to=instruction(node, kind))

    train = [train_reply(4), failed(1, MessageType.TRAIN), train_reply(2), train_reply(3, np.nan)]
    validator.aggregate_train(5, train)
    evaluate = [evaluate_reply(4), failed(1, MessageType.EVALUATE), evaluate_reply(2)]
    validator.aggregate_evaluate(5, evaluate)
    assert inner.calls == [("train", 5, [2, 4, 1]), ("evaluate", 5, [2, 4, 1])]


def test_under_secagg_every_sound_reply_is_told_why_the_sum_is_discarded():
    rejections = []
    validator = _validator(rejections, secure_sum=True)
    replies = [train_reply(1), train_reply(2), train_reply(3, **{"train-loss": float("nan")})]
    assert validator.aggregate_train(1, replies) == (None, None)
    discarded = (
        "the secure sum it is part of includes a rejected reply, so the round's aggregate is "
        "discarded"
    )
    assert rejections == [
        (3, MessageType.TRAIN, "its metric 'train-loss' is nan, not a finite number"),
        (1, MessageType.TRAIN, discarded),
        (2, MessageType.TRAIN, discarded),
    ]


def test_site_order_is_the_order_of_the_site_names_not_of_the_node_ids():
    # Flower's node ids are random; the sites' names fix the order (node id only breaks ties).
    names = {7: "site-0", 3: "site-1", 5: "site-2"}
    inner, aggregated = _Aggregator(), []
    validator = UpdateValidation(
        inner,
        REFERENCE,
        site_name=names.__getitem__,
        on_aggregate=lambda *args: aggregated.append(args),
    )
    validator.aggregate_train(1, [train_reply(3), train_reply(5), train_reply(7)])
    validator.aggregate_evaluate(1, [evaluate_reply(5), evaluate_reply(3), evaluate_reply(7)])
    assert [node for node, _ in aggregated] == [7, 3, 5]
    assert inner.calls == [("train", 1, [7, 3, 5]), ("evaluate", 1, [7, 3, 5])]
