"""Many runs through one Flower simulation: a table's or a study's points, actors kept warm.

A grid of runs used to start one simulation per run: a SuperLink, ``flwr run``, Ray, its actors
and a backbone in each, several seconds before the first round. Here one simulation serves a
whole plan of points. The ServerApp runs the points one after another, each through the same
``run_federation`` as a single run writing its own results folder; every message of a point
carries the point's index (``POINT_RECORD``), so the ClientApp, whose Ray actors stay up between
points, composes that point's config and keeps its backbone and feature cache. A point that
fails records why in its own ``summary.json`` and the next point starts clean: the node state
of a site is cleared when the point changes, and each point's config is composed afresh.

Each point may use fewer sites than the simulation has SuperNodes (a centralized column runs on
one): before the first point every node says which partition it serves (a query message, which
also makes each actor load the first point's backbone), and a point sees only the nodes of its
own sites.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedprompt.config import compose_config
from fedprompt.federation.grid_wrapper import GridWrapper

POINT_RECORD = "fedprompt-point"
"""The config record in every message of a session, holding the point's index."""
PARTITION_METRIC = "partition-id"
"""What a node answers the session's opening query with."""
PROBE_TIMEOUT = 600.0


@dataclass(frozen=True)
class GridPlan:
    """The points of a session: an experiment and, per point, its overrides (with its folder).

    Attributes:
        experiment: The experiment every point starts from.
        points: Each point's Hydra overrides, ``output_dir=<folder>`` among them.
    """

    experiment: str
    points: tuple[tuple[str, ...], ...]

    def save(self, path: Path) -> Path:
        """Write the plan as JSON (the ServerApp and every ClientApp read it)."""
        record = {"experiment": self.experiment, "points": [list(p) for p in self.points]}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return path

    @staticmethod
    def load(path: str | Path) -> GridPlan:
        """The plan in ``path``, read once per process."""
        return _load_plan(str(path))

    def config(self, index: int) -> DictConfig:
        """Point ``index``'s composed config, composed once per process."""
        return _point_config(self.experiment, self.points[index])


@functools.lru_cache(maxsize=4)
def _load_plan(path: str) -> GridPlan:
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    return GridPlan(str(record["experiment"]), tuple(tuple(p) for p in record["points"]))


@functools.lru_cache(maxsize=64)
def _point_config(experiment: str, overrides: tuple[str, ...]) -> DictConfig:
    return compose_config(experiment, list(overrides))


def tag(messages: Iterable[Message], index: int) -> list[Message]:
    """The messages, each carrying the point's index."""
    tagged = list(messages)
    for message in tagged:
        message.content[POINT_RECORD] = ConfigRecord({"index": index})
    return tagged


def point_of(message: Message) -> int | None:
    """The index of the point a message belongs to; None outside a session."""
    record = message.content.config_records.get(POINT_RECORD)
    return None if record is None else int(record["index"])


class PointGrid(GridWrapper):
    """The grid one point sees: the nodes of its own sites, every message tagged with it.

    Args:
        grid: The session's grid.
        index: The point's index in the plan.
        node_ids: The nodes serving the point's sites.
    """

    def __init__(self, grid: Grid, index: int, node_ids: Sequence[int]) -> None:
        super().__init__(grid)
        self.index = index
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        """The point's nodes that are connected."""
        connected = set(self._grid.get_node_ids())
        return [node for node in self.node_ids if node in connected]

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The point's nodes that are connected."""
        return [node for node in self._grid.get_nodes() if node.node_id in self.node_ids]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Tagged, then pushed."""
        return self._grid.push_messages(tag(messages, self.index))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Tagged, then sent."""
        return self._grid.send_and_receive(tag(messages, self.index), timeout=timeout)


def partition_ids(grid: Grid, num_nodes: int, timeout: float = PROBE_TIMEOUT) -> dict[int, int]:
    """Each node's partition, from its answer to one query message.

    Raises:
        RuntimeError: Not every node answered.
    """
    nodes = list(grid.get_node_ids())
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes
    ]
    replies = grid.send_and_receive(tag(messages, 0), timeout=timeout)
    found = {
        reply.metadata.src_node_id: int(next(iter(reply.content.metric_records.values()))[
            PARTITION_METRIC
        ])
        for reply in replies
        if not reply.has_error()
    }
    if len(found) < num_nodes:
        raise RuntimeError(
            f"Only {len(found)} of the session's {num_nodes} SuperNodes said which site they "
            "serve; see flower.log for the others' errors."
        )
    return found


def _completed(folder: Path) -> bool:
    summary = folder / "summary.json"
    if not summary.is_file():
        return False
    return json.loads(summary.read_text(encoding="utf-8")).get("status") == "completed"


def _record_failure(folder: Path, cfg: DictConfig, reason: str) -> None:
    """A ``summary.json`` saying the point failed, where the run could not write its own."""
    summary = folder / "summary.json"
    if summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("status"):
        return
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "experiment": str(cfg.experiment_name),
        "method": str(cfg.method.name),
        "status": "failed",
        "reason": reason,
        "rounds_completed": 0,
        "final": None,
    }
    summary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def run_plan(grid: Grid, plan: GridPlan) -> None:
    """Run every point of ``plan`` not yet completed, one after another, on ``grid``.

    A point that fails is recorded as failed in its folder, with its reason, and the next one
    runs: a grid reports every failure, and a bad point never stops the others.
    """
    from fedprompt.federation.orchestration import run_federation

    sites = max(int(plan.config(i).federation.num_sites) for i in range(len(plan.points)))
    partitions = partition_ids(grid, sites)
    for index in range(len(plan.points)):
        cfg = plan.config(index)
        folder = Path(str(cfg.output_dir))
        if _completed(folder):
            continue
        num_sites = int(cfg.federation.num_sites)
        nodes = sorted(node for node, part in partitions.items() if part < num_sites)
        log(INFO, "[fedprompt] point %d of %d: %s", index + 1, len(plan.points), folder.name)
        try:
            run_federation(PointGrid(grid, index, nodes), cfg)
        except Exception as err:  # the point's failure is its own; the plan goes on
            reason = f"{type(err).__name__}: {err}"
            log(ERROR, "[fedprompt] point %s failed: %s", folder.name, reason)
            _record_failure(folder, cfg, str(err) or reason)
