"""A Grid that meters every message: tensor bytes each way and what each site reports.

Wrapping the Grid rather than a strategy keeps the accounting the same for every strategy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run


def array_payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors a message carries (element count times item size)."""
    return sum(
        int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
        for record in content.array_records.values()
        for array in record.values()
    )


@dataclass
class SiteTraffic:
    """One site's messages in one round."""

    bytes_down: int = 0
    bytes_up: int = 0
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class MeteredGrid(Grid):
    """Delegates to Flower's Grid and records each round's traffic per node."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._round: dict[int, SiteTraffic] = {}

    def set_run(self, run: Run) -> None:
        """Delegated to the wrapped grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """Delegated to the wrapped grid."""
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated to the wrapped grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated to the wrapped grid."""
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Delegated to the wrapped grid."""
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated to the wrapped grid (not metered: strategies use send_and_receive)."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated to the wrapped grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait for replies, and record both directions."""
        messages = list(messages)
        for message in messages:
            traffic = self._round.setdefault(message.metadata.dst_node_id, SiteTraffic())
            traffic.bytes_down += array_payload_bytes(message.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            traffic = self._round.setdefault(reply.metadata.src_node_id, SiteTraffic())
            if reply.has_error():
                traffic.errors.append(str(reply.error.reason))
                continue
            traffic.bytes_up += array_payload_bytes(reply.content)
            metrics = {
                key: value
                for record in reply.content.metric_records.values()
                for key, value in record.items()
                if isinstance(value, (int, float))
            }
            if reply.metadata.message_type == MessageType.TRAIN:
                traffic.train.update(metrics)
            else:
                traffic.evaluate.update(metrics)
        return replies

    def take_round(self) -> dict[int, SiteTraffic]:
        """This round's traffic by node id; starts the next round's record."""
        taken, self._round = self._round, {}
        return taken
