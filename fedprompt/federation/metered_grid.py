"""A Grid that meters every message: tensor bytes each way, what each site reports, who is missing.

Wrapping the Grid rather than a strategy keeps the accounting the same for every strategy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from fedprompt.federation.grid_wrapper import GridWrapper

# fedprompt sites start an error reason with their name: "[hospital-b] Image file ...".
_NAMED_REASON = re.compile(r"^\[([^\]]+)\] ")


def array_payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors a message carries (element count times item size).

    An array in Flower's legacy form (no dtype: serialized NumPy bytes) counts its bytes.
    """
    return sum(
        int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
        if array.dtype
        else len(array.data)
        for record in content.array_records.values()
        for array in record.values()
    )


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors and of the raw bytes values a message carries.

    SecAgg+ moves keys, encrypted key shares and masked vectors as bytes in config records;
    counting them makes its traffic comparable with a plain round's tensors.
    """
    raw = 0
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            raw += sum(len(item) for item in items if isinstance(item, bytes))
    return array_payload_bytes(content) + raw


class SiteDirectory:
    """The name of the site behind each node id, for logs and each round's metrics line.

    In deployment a node's name is the one the coordinating centre registered its key under
    (``flwr supernode register --name``), and never what a node says of itself: an unnamed node
    stays ``node-<id>``. In simulation (``trust_reported_names``) it is the partition's site
    name, learnt from the ``site-index`` a site reports, or from an error reply, which fedprompt
    sites begin with their name in brackets.

    A registered name held by two nodes (two keys registered under one name) is ambiguous: both
    nodes are named ``<name>#<node id>`` and ``clashes`` says why neither may take part.
    """

    def __init__(
        self, site_names: Sequence[str] = (), *, trust_reported_names: bool = True
    ) -> None:
        self.site_names = list(site_names)
        self.trust_reported_names = trust_reported_names
        self._names: dict[int, str] = {}
        self._registered: dict[int, str] = {}

    def learn_nodes(self, nodes: Iterable[NodeInfo]) -> None:
        """Registration names, which take precedence over what a site says of itself."""
        for node in nodes:
            if node.name:
                self._registered[node.node_id] = node.name
                self._names[node.node_id] = node.name

    def clashes(self) -> dict[int, str]:
        """Nodes whose registered name another node also holds, with the reason to refuse them."""
        holders: dict[str, list[int]] = {}
        for node_id, name in self._registered.items():
            holders.setdefault(name, []).append(node_id)
        return {
            node_id: (
                f"the registered name {name!r} is held by {len(ids)} keys (nodes "
                f"{', '.join(str(i) for i in sorted(ids))}); a site name must belong to one key, "
                "so none of them takes part until the centre unregisters the wrong one"
            )
            for name, ids in holders.items()
            if len(ids) > 1
            for node_id in ids
        }

    def learn_reply(self, node_id: int, reply: Message) -> None:
        """The partition index a simulated site reports, or the name its error begins with."""
        if node_id in self._registered or not self.trust_reported_names:
            return
        if reply.has_error():
            match = _NAMED_REASON.match(reply.error.reason)
            if match and node_id not in self._names:
                self._names[node_id] = match.group(1)
            return
        for record in reply.content.metric_records.values():
            index = record.get("site-index")
            if isinstance(index, int) and 0 <= index < len(self.site_names):
                self._names[node_id] = self.site_names[index]

    def name(self, node_id: int) -> str:
        """The site's name, or ``node-<id>`` while it is unknown; unique per node."""
        name = self._names.get(node_id, f"node-{node_id}")
        if node_id in self._registered and node_id in self.clashes():
            return f"{name}#{node_id}"
        return name


@dataclass
class SiteTraffic:
    """One site's messages in one round."""

    bytes_down: int = 0
    bytes_up: int = 0
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)
    instructed: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    aggregated: int | None = None

    @property
    def complete(self) -> bool:
        """Whether the site answered every instruction it was sent (a rejected answer counts)."""
        return not self.errors and sorted(self.answered) == sorted(self.instructed)


@dataclass
class RoundTraffic:
    """A round's traffic by node id, and which nodes were connected during it."""

    nodes: dict[int, SiteTraffic]
    connected: set[int]


class MeteredGrid(GridWrapper):
    """Delegates to Flower's Grid and records each round's traffic per node."""

    def __init__(self, grid: Grid, sites: SiteDirectory | None = None) -> None:
        super().__init__(grid)
        self.sites = sites if sites is not None else SiteDirectory()
        self._round: dict[int, SiteTraffic] = {}
        self._connected: set[int] = set()

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes strategies may sample: not those whose registered name clashes.

        A clashing node is recorded as rejected in the round's line, with the reason.
        """
        nodes = [node.node_id for node in self.get_nodes()]
        clashes = self.sites.clashes()
        for node_id in nodes:
            if node_id in clashes and clashes[node_id] not in self._traffic(node_id).rejected:
                self._traffic(node_id).rejected.append(clashes[node_id])
        return [node_id for node_id in nodes if node_id not in clashes]

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Delegated to the wrapped grid; learns registration names and who is connected."""
        nodes = list(self._grid.get_nodes())
        self.sites.learn_nodes(nodes)
        self._connected.update(node.node_id for node in nodes)
        return nodes

    def _traffic(self, node_id: int) -> SiteTraffic:
        return self._round.setdefault(node_id, SiteTraffic())

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait for replies, and record both directions and every missing reply."""
        messages = list(messages)
        for message in messages:
            traffic = self._traffic(message.metadata.dst_node_id)
            traffic.bytes_down += payload_bytes(message.content)
            traffic.instructed.append(message.metadata.message_type)
        received = list(self._grid.send_and_receive(messages, timeout=timeout))
        # The grid has now given each message its id. The SuperLink answers for a node that
        # went silent, from its own node id, so replies are matched to where the message went.
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered: set[tuple[int, str]] = set()
        replies = []
        for reply in received:
            node_id = destination.get(reply.metadata.reply_to_message_id)
            if node_id is None or (not reply.has_error() and reply.metadata.src_node_id != node_id):
                self._unasked(reply)
                continue
            replies.append(reply)
            self.sites.learn_reply(node_id, reply)
            traffic = self._traffic(node_id)
            answered.add((node_id, reply.metadata.message_type))
            if reply.has_error():
                traffic.errors.append(str(reply.error.reason))
                continue
            traffic.answered.append(reply.metadata.message_type)
            traffic.bytes_up += payload_bytes(reply.content)
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
        waited = f" within {timeout:.0f} s" if timeout is not None else ""
        for message in messages:
            key = (message.metadata.dst_node_id, message.metadata.message_type)
            if key not in answered:
                kind = "training" if key[1] == MessageType.TRAIN else "evaluation"
                self._traffic(key[0]).errors.append(f"no reply to the {kind} request{waited}")
        return replies

    def _unasked(self, reply: Message) -> None:
        """A reply this round did not ask that node for: left out, and recorded as rejected."""
        sender = reply.metadata.src_node_id
        kind = "update" if reply.metadata.message_type == MessageType.TRAIN else "evaluation"
        self._traffic(sender).rejected.append(
            f"{kind} rejected: node {sender} was not asked for it this round"
        )

    def record_rejection(self, node_id: int, message_type: str, reason: str) -> None:
        """Note that validation refused this node's reply (see ``UpdateValidation``)."""
        kind = "update" if message_type == MessageType.TRAIN else "evaluation"
        self._traffic(node_id).rejected.append(f"{kind} rejected: {reason}")

    def record_withheld(self, node_id: int, reason: str) -> None:
        """Note that a site's well-formed update was left out of the aggregate, and why."""
        self._traffic(node_id).withheld.append(reason)

    def record_aggregated(self, node_id: int, num_examples: int) -> None:
        """Note that this node's update entered the round's aggregate, with its example count."""
        self._traffic(node_id).aggregated = num_examples

    def record_lost(self, node_ids: Sequence[int], reason: str) -> None:
        """Note that these nodes' work never reached an aggregate (a halted SecAgg+ round)."""
        for node_id in node_ids:
            self._traffic(node_id).errors.append(reason)

    def take_round(self) -> RoundTraffic:
        """This round's traffic by node id and the nodes seen connected; starts the next round."""
        taken = RoundTraffic(self._round, self._connected)
        self._round, self._connected = {}, set()
        return taken
