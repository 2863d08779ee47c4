"""Update validation's less travelled refusals: tensors that do not decode to what they claim,
malformed metric records, list-valued metrics, and the norm test against the other sites' median
(hand-made replies, hand-computed aggregates)."""

import re

import numpy as np
import pytest
from flower_messages import instruction
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedprompt.federation.validation import UpdateValidation

SHAPE = (2, 3)


def _reply(node, value=1.0, array=None, metrics=None, extra_records=()):
    """A site's train reply: ``ctx`` filled with ``value`` unless ``array`` is given."""
    array = array if array is not None else Array(np.full(SHAPE, value, np.float32))
    content = RecordDict(
        {
            "arrays": ArrayRecord({"ctx": array}),
            "metrics": MetricRecord(metrics or {"num-examples": 10, "train-loss": 0.5}),
        }
    )
    for name in extra_records:
        content[name] = MetricRecord({"num-examples": 10, "train-loss": 0.5})
    return Message(content, reply_to=instruction(node, MessageType.TRAIN))


def _aggregate(replies):
    """The aggregate of ``replies`` after validation, and the (node, reason) of each rejection."""
    rejections = []
    validator = UpdateValidation(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
        ArrayRecord({"ctx": Array(np.zeros(SHAPE, np.float32))}),
        max_update_ratio=10.0,
        on_reject=lambda node, _kind, reason: rejections.append((node, reason)),
    )
    arrays, metrics = validator.aggregate_train(1, replies)
    return arrays, metrics, rejections


def _numpy_bytes(array):
    return Array(np.asarray(array, np.float32)).data


UNDECODABLE = {
    "bytes that are no .npy file": (
        Array(dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=b"junk" * 6),
        r"tensor 'ctx' cannot be decoded",
    ),
    "another serialization": (
        Array(dtype="float32", shape=SHAPE, stype="torch.save", data=_numpy_bytes(np.ones(SHAPE))),
        r"tensor 'ctx' cannot be decoded",
    ),
    "a transposed array under the expected shape": (
        Array(
            dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=_numpy_bytes(np.ones((3, 2)))
        ),
        r"tensor 'ctx' decodes to shape \(3, 2\), expected \(2, 3\)",
    ),
}


@pytest.mark.parametrize("fault", list(UNDECODABLE))
def test_a_tensor_that_does_not_decode_to_its_declared_shape_is_rejected(fault):
    array, reason = UNDECODABLE[fault]
    arrays, _, rejections = _aggregate([_reply(2, 1.0), _reply(3, 2.0), _reply(9, array=array)])
    assert [node for node, _ in rejections] == [9]
    assert re.search(reason, rejections[0][1]), rejections[0][1]
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full(SHAPE, 1.5, np.float32))


def test_a_reply_with_two_metric_records_is_rejected():
    replies = [_reply(2, 1.0), _reply(3, 2.0), _reply(9, 1.5, extra_records=["more"])]
    arrays, _, rejections = _aggregate(replies)
    assert rejections == [
        (9, "it carries 2 metric records where a reply carries exactly one"),
    ]
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full(SHAPE, 1.5, np.float32))


def test_a_list_valued_metric_with_a_nan_is_rejected():
    good = {"num-examples": 10, "train-loss": 0.5, "class-loss": [0.1, 0.2]}
    bad = {"num-examples": 10, "train-loss": 0.5, "class-loss": [0.1, float("nan")]}
    replies = [_reply(2, 1.0, metrics=good), _reply(3, 2.0, metrics=good), _reply(9, metrics=bad)]
    _, _, rejections = _aggregate(replies)
    assert [node for node, _ in rejections] == [9]
    assert "its metric 'class-loss' is [0.1, nan], not a finite number" in rejections[0][1]


def test_a_list_valued_metric_of_finite_numbers_is_averaged():
    replies = [
        _reply(2, 1.0, metrics={"num-examples": 10, "class-loss": [0.1, 0.2]}),
        _reply(3, 2.0, metrics={"num-examples": 30, "class-loss": [0.5, 0.6]}),
    ]
    arrays, metrics, rejections = _aggregate(replies)
    assert rejections == []
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full(SHAPE, 1.75, np.float32))
    # (10 * 0.1 + 30 * 0.5) / 40 and (10 * 0.2 + 30 * 0.6) / 40
    np.testing.assert_allclose(metrics["class-loss"], [0.4, 0.5])


def test_two_outliers_are_each_measured_against_the_median_of_the_others():
    # Each outlier's others are [1, 1, 1, 30]: median 1 (limit 10), though their maximum is 30.
    replies = [_reply(2, 1.0), _reply(3, 1.0), _reply(4, 1.0), _reply(8, 30.0), _reply(9, 30.0)]
    arrays, _, rejections = _aggregate(replies)
    assert [node for node, _ in rejections] == [8, 9]
    assert all("above 10 x the other sites' median" in reason for _, reason in rejections)
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.ones(SHAPE, np.float32))
