"""Instructions as a SuperLink delivers them to a node, for tests that drive Flower by hand."""

import time

from flwr.app import Message, Metadata, RecordDict


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
