"""Warm the simulation's actors while the server prepares, so round 1 is not their cold start.

In a simulation each Ray actor imports the ClientApp and loads the backbone on the first message
it handles. Without a warm-up that first message is round 1's training, so round 1 took the
actors' cold start on top of its own work (12.5-15.3 s against 0.3-0.6 s for the later rounds of
the quickstart on two cores), after the server had loaded its own backbone and encoded the
central test split.

``ActorWarmUp`` pushes one query message to every node before the server prepares (the same
query a grid session opens with: the node loads the run's backbone and says which partition it
serves) and collects the answers just before round 1, so round 1 costs what the later rounds
cost. The actors load while the server works, which shortens the run where cores are free.
A node whose warm-up fails is not dropped here: round 1 asks it again and records its refusal
as for any round.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

POLL_SECONDS = 0.1


class ActorWarmUp:
    """Query messages in flight to every node; ``wait`` collects their answers.

    Args:
        grid: The run's grid; the messages go to the nodes connected now.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._started = time.monotonic()
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for node in grid.get_node_ids()
        ]
        self._pending = set(grid.push_messages(messages)) if messages else set()
        self._sent = len(self._pending)
        self.failed = 0

    def wait(self, timeout: float) -> int:
        """Collect the answers (up to ``timeout`` seconds); return how many nodes are warm."""
        deadline = time.monotonic() + timeout
        while self._pending:
            for reply in self._grid.pull_messages(sorted(self._pending)):
                self._pending.discard(reply.metadata.reply_to_message_id)
                self.failed += reply.has_error()
            if not self._pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        ready = self._sent - len(self._pending) - self.failed
        seconds = time.monotonic() - self._started
        log(INFO, "[fedprompt] %d of %d sites ready after %.1f s", ready, self._sent, seconds)
        if self._pending or self.failed:
            log(
                WARNING,
                "[fedprompt] %d site(s) did not get ready (%d failed, %d did not answer); round "
                "1 asks them again and records any refusal.",
                self._sent - ready,
                self.failed,
                len(self._pending),
            )
        return ready
