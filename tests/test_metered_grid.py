import time

import numpy as np
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
from flwr.serverapp import Grid

from fedprompt.federation.metered_grid import MeteredGrid, array_payload_bytes


def _message(content: RecordDict, node_id: int, message_type: str) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node_id}{message_type}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


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
        return [1, 2, 3]

    def get_nodes(self):
        raise NotImplementedError

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
        grid.send_and_receive([_message(content, node, message_type) for node in (1, 2, 3)])


def test_payload_bytes_count_tensor_elements():
    content = RecordDict(
        {"a": ArrayRecord([np.zeros((4, 8), np.float32), np.zeros(3, np.float64)])}
    )
    assert array_payload_bytes(content) == 4 * 8 * 4 + 3 * 8


def test_metered_grid_records_bytes_metrics_and_errors_per_node():
    grid = MeteredGrid(ReplyingGrid())
    _round(grid)
    traffic = grid.take_round()
    assert sorted(traffic) == [1, 2, 3]
    assert traffic[1].bytes_down == 2 * 4 * 8 * 4  # the global prompt, sent for train and eval
    assert traffic[1].bytes_up == 2 * 8 * 4  # only the train reply carries tensors
    assert traffic[2].train["num-examples"] == 20 and traffic[2].evaluate["site-index"] == 1
    assert traffic[3].bytes_up == 0 and traffic[3].errors == ["site broke", "site broke"]
    assert grid.take_round() == {}
    assert list(grid.get_node_ids()) == [1, 2, 3]
