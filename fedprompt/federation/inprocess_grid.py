"""A Grid that runs each node's ClientApp in this process: a federation without Flower's engine.

For tests and for debugging a site: each message goes straight to the node's ClientApp with the
node's own ``Context`` (its node config, and state kept across rounds), as a SuperNode would
deliver it, and every reply is kept for inspection. A node can be taken offline (it stops
answering, like a hospital whose machine went down) or given another ClientApp (a site that
sends garbage).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedprompt.federation.client_app import app as fedprompt_client_app

ClientAppCall = Callable[[Message, Context], Message]
FIRST_NODE_ID = 101


class InProcessGrid(Grid):
    """Nodes ``101, 102, ...``, one per entry of ``node_configs``, all answered in this process.

    Args:
        node_configs: Each node's ``--node-config`` (``partition-id`` or ``site-config``).
        run_config: The run-config every node's Context carries.
        names: Registration names by node position, as ``flwr supernode register --name`` sets.
        apps: A ClientApp by node position, replacing fedprompt's (a faulty site).
    """

    def __init__(
        self,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any],
        names: Sequence[str] = (),
        apps: Mapping[int, ClientAppCall] | None = None,
        run_id: int = 1,
    ) -> None:
        self._run = Run.create_empty(run_id)
        # Strategies build messages from the process's task identity, which Flower's ServerApp
        # process sets as its simulation does.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        node_ids = [FIRST_NODE_ID + i for i in range(len(node_configs))]
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config=dict(config),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id, config in zip(node_ids, node_configs, strict=True)
        }
        self.names = dict(zip(node_ids, names, strict=False))
        self.apps = {FIRST_NODE_ID + i: app for i, app in (apps or {}).items()}
        self.offline: set[int] = set()
        self.replies: list[Message] = []
        self._unpulled: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        """Keep the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message as Flower's grids create it."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The nodes that are online."""
        return [node.node_id for node in self.get_nodes()]

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The online nodes with their registration names."""
        return [
            NodeInfo(node_id=node_id, name=self.names.get(node_id, ""))
            for node_id in self.contexts
            if node_id not in self.offline
        ]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each online node answers at once; ``pull_messages`` hands the answers over."""
        ids = []
        for message in messages:
            reply = self._deliver(message)
            ids.append(message.metadata.message_id)
            if reply is not None:
                self._unpulled[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The answers to these messages not pulled yet (an offline node's never come)."""
        return [self._unpulled.pop(i) for i in message_ids if i in self._unpulled]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Each online node answers at once; an offline node never does."""
        replies = [self._deliver(message) for message in messages]
        return [reply for reply in replies if reply is not None]

    def _deliver(self, message: Message) -> Message | None:
        """The node's answer to ``message`` (kept in ``replies``); None from an offline node."""
        # Flower's grids give each message its id the same way, in place.
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        node_id = message.metadata.dst_node_id
        if node_id in self.offline:
            return None
        app = self.apps.get(node_id, fedprompt_client_app)
        # Each node gets its own copy, as after a trip through the SuperLink: a ClientApp
        # (Flower's SecAgg+ mod, for one) may change the content it receives.
        delivered = Message(metadata=message.metadata, content=copy.deepcopy(message.content))
        try:
            reply = app(delivered, self.contexts[node_id])
        except Exception as err:  # a ClientApp that raises gets Flower's error reply
            reason = f"{type(err)}:<'{err}'>"
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            reply = Message(error, reply_to=message)
        self.replies.append(reply)
        return reply
