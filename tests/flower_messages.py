"""Instructions as a SuperLink delivers them to a node, for tests that drive Flower by hand."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

_IDENTITY = ("task_id", "run_id", "node_id")


def instruction(node: int, message_type: str, content: RecordDict | None = None) -> Message:
    """A message from the server (node 0) to ``node``, ready to be replied to."""
    metadata = Metadata(
        run_id=1,
        message_id=f"instruction-{node}-{message_type}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content if content is not None else RecordDict(), metadata=metadata)


@contextmanager
def server_task_identity(run_id: int = 1) -> Iterator[None]:
    """This process as a ServerApp's: strategies address their instructions from it.

    Set and restored through ``TaskIdentity``'s public properties, as Flower's own ServerApp
    runtime sets them; Flower has no public constructor that sets them short of running a server.
    """
    saved = {}
    for name in _IDENTITY:
        try:
            saved[name] = getattr(TaskIdentity, name)
        except RuntimeError:  # not set yet in this process
            saved[name] = None
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)
