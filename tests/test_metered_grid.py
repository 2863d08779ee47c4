import time

import numpy as np
from flower_messages import instruction
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from fedprompt.federation.metered_grid import MeteredGrid, SiteDirectory, array_payload_bytes


class ReplyingGrid(Grid):
    """Answers each message at once: node 3 fails, others reply with arrays twice as long."""

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        raise NotImplementedError  # the metered grid asks get_nodes, which carries names

    def get_nodes(self):
        return [NodeInfo(node_id=n, name="hospital-a" if n == 1 else "") for n in (1, 2, 3)]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == 3:
                replies.append(Message(Error(code=1, reason="site broke"), reply_to=msg))
                continue
            metrics = MetricRecord({"num-examples": 10 * node, "site-index": node - 1, "x": 0.5})
            content = RecordDict({"metrics": metrics})
            if msg.metadata.message_type == MessageType.TRAIN:
                content["arrays"] = ArrayRecord([np.zeros((2, 8), np.float32)])
            replies.append(Message(content, reply_to=msg))
        return replies


def _round(grid: MeteredGrid) -> None:
    arrays = ArrayRecord([np.zeros((4, 8), np.float32)])
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        grid.send_and_receive([instruction(node, message_type, content) for node in (1, 2, 3)])


def test_payload_bytes_count_tensor_elements():
    content = RecordDict(
        {"a": ArrayRecord([np.zeros((4, 8), np.float32), np.zeros(3, np.float64)])}
    )
    assert array_payload_bytes(content) == 4 * 8 * 4 + 3 * 8


def test_metered_grid_records_bytes_metrics_and_errors_per_node():
    grid = MeteredGrid(ReplyingGrid())
    _round(grid)
    taken = grid.take_round()
    traffic = taken.nodes
    assert sorted(traffic) == [1, 2, 3]
    assert traffic[1].bytes_down == 2 * 4 * 8 * 4  # the global prompt, sent for train and eval
    assert traffic[1].bytes_up == 2 * 8 * 4  # only the train reply carries tensors
    assert traffic[2].train["num-examples"] == 20 and traffic[2].evaluate["site-index"] == 1
    assert traffic[3].bytes_up == 0 and traffic[3].errors == ["site broke", "site broke"]
    assert traffic[2].complete and not traffic[3].complete
    assert grid.take_round().nodes == {}
    assert list(grid.get_node_ids()) == [1, 2, 3]
    assert grid.take_round().connected == {1, 2, 3}


def test_sites_are_named_by_registration_partition_or_error():
    grid = MeteredGrid(ReplyingGrid(), SiteDirectory(["site-0", "site-1"]))
    list(grid.get_node_ids())
    _round(grid)
    # node 1: registered name wins over its site-index; node 2: site-index 1; node 3: unknown
    assert [grid.sites.name(n) for n in (1, 2, 3)] == ["hospital-a", "site-1", "node-3"]
    reply = Message(
        Error(code=2, reason="[hospital-c] CorruptImageError: ..."),
        reply_to=instruction(3, MessageType.TRAIN),
    )
    grid.sites.learn_reply(3, reply)
    assert grid.sites.name(3) == "hospital-c"


class SilentGrid(ReplyingGrid):
    """Node 12 went silent and the SuperLink answers for it; node 13 never answers at all."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == 12:
                metadata = Metadata(
                    run_id=1,
                    message_id="",
                    src_node_id=SUPERLINK_NODE_ID,
                    dst_node_id=SUPERLINK_NODE_ID,
                    reply_to_message_id=msg.metadata.message_id,
                    group_id="1",
                    created_at=time.time(),
                    ttl=3600.0,
                    message_type=msg.metadata.message_type,
                )
                error = Error(code=3, reason="Error: Node Unavailable")
                replies.append(Message(error=error, metadata=metadata))
            elif node == 11:
                metrics = MetricRecord({"num-examples": 10})
                replies.append(Message(RecordDict({"metrics": metrics}), reply_to=msg))
        return replies


def test_a_silent_site_is_recorded_against_its_own_node():
    grid = MeteredGrid(SilentGrid())
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    grid.send_and_receive(
        [instruction(node, MessageType.EVALUATE, content) for node in (11, 12, 13)], timeout=30
    )
    traffic = grid.take_round().nodes
    assert sorted(traffic) == [11, 12, 13]  # nothing filed under the SuperLink's own id
    assert traffic[12].errors == ["Error: Node Unavailable"]
    assert traffic[13].errors == ["no reply to the evaluation request within 30 s"]
    assert traffic[11].complete and not traffic[12].complete and not traffic[13].complete


def test_rejections_are_recorded():
    grid = MeteredGrid(ReplyingGrid())
    grid.record_rejection(2, MessageType.TRAIN, "tensor 'ctx' holds NaN or Inf")
    assert grid.take_round().nodes[2].rejected == ["update rejected: tensor 'ctx' holds NaN or Inf"]


class ForgingGrid(ReplyingGrid):
    """Node 1 answers, and node 9, which was asked nothing, slips in a reply of its own."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        forged = Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 1000})}),
            reply_to=instruction(9, MessageType.TRAIN),
        )
        # A reply that claims to answer node 1's message, sent from node 9.
        stolen = Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 1000})}),
            reply_to=messages[0],
        )
        stolen.metadata.__dict__["_src_node_id"] = 9
        return [*replies, forged, stolen]


def test_a_reply_from_a_node_the_round_did_not_ask_is_rejected_and_recorded():
    grid = MeteredGrid(ForgingGrid())
    content = RecordDict({"arrays": ArrayRecord([np.zeros(2, np.float32)])})
    messages = [instruction(node, MessageType.TRAIN, content) for node in (1, 2)]
    replies = grid.send_and_receive(messages)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    traffic = grid.take_round().nodes
    assert traffic[9].rejected == ["update rejected: node 9 was not asked for it this round"] * 2
    assert traffic[9].train == {} and traffic[1].train["num-examples"] == 10


class TwinGrid(ReplyingGrid):
    """Two keys registered under one name: nodes 1 and 4 both hold 'hospital-a'."""

    def get_nodes(self):
        names = {1: "hospital-a", 2: "hospital-b", 4: "hospital-a"}
        return [NodeInfo(node_id=n, name=name) for n, name in names.items()]


def test_nodes_sharing_a_registered_name_are_not_sampled_and_are_recorded():
    grid = MeteredGrid(TwinGrid(), SiteDirectory(trust_reported_names=False))
    assert list(grid.get_node_ids()) == [2]
    names = {node: grid.sites.name(node) for node in (1, 2, 4)}
    assert names == {1: "hospital-a#1", 2: "hospital-b", 4: "hospital-a#4"}
    traffic = grid.take_round().nodes
    for node in (1, 4):
        (reason,) = traffic[node].rejected
        assert "'hospital-a' is held by 2 keys (nodes 1, 4)" in reason


def test_in_deployment_a_node_is_never_named_by_what_it_says_of_itself():
    grid = MeteredGrid(ReplyingGrid(), SiteDirectory(["site-0"], trust_reported_names=False))
    list(grid.get_node_ids())
    _round(grid)  # node 2 reports site-index 1, node 3 an error starting with its claimed name
    grid.sites.learn_reply(
        3, Message(Error(code=2, reason="[hospital-a] ..."), reply_to=instruction(3, "train"))
    )
    assert [grid.sites.name(n) for n in (1, 2, 3)] == ["hospital-a", "node-2", "node-3"]
