"""Flower's per-round overhead (serialisation, messaging, aggregation) as a share of round time.

Usage: python benchmarks/flower_overhead.py [--quick] [--sites 4] [--rounds 4]
       [--images-per-site 8] [--backbone biomedclip-random]

The same rounds are timed three ways, side by side in one run, on cached features:

- through Flower: ``fedprompt simulate quickstart`` with ``federation.client_cpus=2`` on this
  2-core machine, so one Ray actor serves the sites one after another; the round time is the
  ``seconds`` of ``metrics.jsonl`` (train, evaluate and central evaluation), median over the
  rounds after the first; round 1 is printed beside it (the actors load their backbone while
  the server prepares, ``ActorWarmUp``, so round 1 should cost what the later rounds cost);
- through the ClientApp in this process: for every site a train and an evaluate ``Message``,
  serialised to protobuf bytes and back both ways as on the wire, handled by fedprompt's
  ``ClientApp`` (its config bridge and site set-up included), the replies aggregated by FedAvg,
  then the central evaluation; no SuperLink, simulation engine or Ray;
- directly: the same ``train_round`` and ``evaluate_round`` calls for every site, and the same
  central evaluation, in this process with 2 torch threads, no Flower involved.

Flower's engine (messaging through the SuperLink's state, polling, Ray dispatch) costs the first
minus the second; serialisation, aggregation and the ClientApp shell the second minus the third.
The feature cache is filled before any of them runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import interleaved_seconds, machine_line, median
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp.strategy import FedAvg
from omegaconf import DictConfig

from fedprompt.config import compose_config
from fedprompt.data.features import PROCESS_FEATURE_CACHE
from fedprompt.federation import client_app
from fedprompt.federation.run_config import default_run_config, overrides_to_run_config
from fedprompt.site_rounds import (
    backbone_for,
    build_learner,
    evaluate_round,
    splits_and_plan,
    train_round,
)
from fedprompt.training import evaluate

CLIENT_CPUS = 2


def _overrides(args: argparse.Namespace, workdir: Path) -> list[str]:
    per_class = math.ceil(args.images_per_site * args.sites / 4)
    return [
        f"backbone={args.backbone}",
        "dataset=synthetic",
        f"dataset.root={workdir / 'data'}",  # made beforehand: an absent root means a stand-in
        f"dataset.train_per_class={per_class}",
        "dataset.val_per_class=0",
        f"dataset.test_per_class={per_class}",
        f"federation.num_sites={args.sites}",
        f"federation.rounds={args.rounds}",
        f"federation.client_cpus={CLIENT_CPUS}",
        "train.local_epochs=1",
        "train.batch_size=8",
        f"features.cache_dir={workdir / 'features'}",
        f"output_dir={workdir / 'run'}",
    ]


def direct_round(cfg: DictConfig) -> None:
    """One round's work without Flower: every site trains, every site evaluates, then central."""
    backbone = backbone_for(cfg)
    splits, _ = splits_and_plan(cfg)
    learner = build_learner(cfg, backbone, list(splits.classnames))
    state = learner.trainable_state()
    sites = int(cfg.federation.num_sites)
    for site in range(sites):
        train_round(cfg, site, state, server_round=2)
    for site in range(sites):
        evaluate_round(cfg, site, state)
    features, labels = PROCESS_FEATURE_CACHE.get(
        backbone, splits.test, int(cfg.features.batch_size)
    )
    evaluate(learner, features, labels, len(splits.classnames))


def _wire(message: Message) -> Message:
    """The message after a trip through protobuf bytes, as between SuperLink and a node."""
    proto = type(message_to_proto(message))()
    proto.ParseFromString(message_to_proto(message).SerializeToString())
    return message_from_proto(proto)


def _instruction(content: RecordDict, kind: str, node: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"{kind}-{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="2",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def clientapp_round(cfg: DictConfig, overrides: list[str]) -> None:
    """One round through fedprompt's ClientApp in this process, messages serialised both ways."""
    backbone = backbone_for(cfg)
    splits, _ = splits_and_plan(cfg)
    learner = build_learner(cfg, backbone, list(splits.classnames))
    sites = int(cfg.federation.num_sites)
    run_config = default_run_config("quickstart") | overrides_to_run_config("quickstart", overrides)
    content = RecordDict(
        {
            "arrays": ArrayRecord(learner.trainable_state()),
            "config": ConfigRecord({"server-round": 2}),
        }
    )
    replies: dict[str, list[Message]] = {MessageType.TRAIN: [], MessageType.EVALUATE: []}
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        for site in range(sites):
            context = Context(
                run_id=1,
                node_id=site + 1,
                node_config={"partition-id": site, "num-partitions": sites},
                state=RecordDict(),
                run_config=run_config,
            )
            reply = client_app.app(_wire(_instruction(content, kind, site + 1)), context)
            replies[kind].append(_wire(reply))
    strategy = FedAvg()
    arrays, _ = strategy.aggregate_train(2, replies[MessageType.TRAIN])
    strategy.aggregate_evaluate(2, replies[MessageType.EVALUATE])
    assert arrays is not None
    learner.load_trainable_state(arrays.to_torch_state_dict())
    features, labels = PROCESS_FEATURE_CACHE.get(
        backbone, splits.test, int(cfg.features.batch_size)
    )
    evaluate(learner, features, labels, len(splits.classnames))


def flower_rounds(overrides: list[str], workdir: Path) -> tuple[list[dict], float, str]:
    """Run ``fedprompt simulate``: its ``metrics.jsonl`` lines, wall seconds and warm-up line."""
    command = [str(Path(sys.executable).with_name("fedprompt")), "simulate", "quickstart"]
    log = workdir / "simulate.log"
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            command + overrides, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        ).returncode
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if code != 0:
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"fedprompt simulate failed ({code}):\n{tail}")
    lines = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    ready = next((line for line in text.splitlines() if "sites ready after" in line), "")
    return [json.loads(line) for line in lines], wall, ready.split("[fedprompt] ")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 sites, 2 rounds")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=8)
    parser.add_argument("--backbone", default="biomedclip-random")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds, args.images_per_site = 2, 2, 4
    torch.set_num_threads(CLIENT_CPUS)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregation

    with tempfile.TemporaryDirectory(prefix="fedprompt-overhead-") as tmp:
        workdir = Path(tmp)
        (workdir / "data").mkdir()
        overrides = _overrides(args, workdir)
        cfg = compose_config("quickstart", overrides)
        start = time.perf_counter()
        direct_round(cfg)  # fills the feature cache, in memory and on disk
        warm_up = time.perf_counter() - start
        runs = {
            "direct": lambda: direct_round(cfg),
            "clientapp": lambda: clientapp_round(cfg, overrides),
        }
        runs["clientapp"]()  # composes the run-config's config once, as an actor does
        before = interleaved_seconds(runs, repeats=2)
        lines, wall, ready = flower_rounds(overrides, workdir)
        after = interleaved_seconds(runs, repeats=2)

    direct = median(before["direct"] + after["direct"])
    in_process = median(before["clientapp"] + after["clientapp"])
    steady = [line["seconds"] for line in lines[1:]] or [lines[0]["seconds"]]
    through_flower = median(steady)
    overhead = through_flower - direct
    engine = through_flower - in_process
    bytes_per_round = median([line["bytes_up"] + line["bytes_down"] for line in lines])
    messages = 4 * args.sites  # train and evaluate, each down and up, per site
    print(f"machine: {machine_line()}")
    print(
        f"{args.backbone}, {args.sites} sites x {args.images_per_site} train + "
        f"{args.images_per_site} test images, batch 8, 1 local epoch, cached features "
        f"(filling the cache took {warm_up:.1f} s)"
    )
    print(f"  round through Flower (median of rounds 2..{args.rounds}):  {through_flower:6.2f} s")
    print(f"  through the ClientApp in this process (median of 4): {in_process:6.2f} s")
    print(f"  the same work without Flower (median of 4):          {direct:6.2f} s")
    print(
        f"  Flower's overhead: {overhead:.2f} s per round = {100 * overhead / through_flower:.1f}% "
        f"of the round ({messages} messages, {bytes_per_round / 1024:.1f} kB per round), of which"
    )
    print(
        f"    engine (SuperLink state, polling, Ray): {engine:.2f} s "
        f"= {100 * engine / through_flower:.1f}%, {1000 * engine / messages:.0f} ms per message"
    )
    print(
        f"    serialisation, aggregation, ClientApp shell: {in_process - direct:.2f} s "
        f"= {100 * (in_process - direct) / through_flower:.1f}%"
    )
    print(f"  Flower round times, s: {[round(line['seconds'], 2) for line in lines]}")
    first = lines[0]["seconds"]
    print(
        f"  round 1: {first:.2f} s = x{first / through_flower:.2f} the later rounds' median "
        f"(the actors' warm-up: {ready or 'not logged'}); fedprompt simulate wall {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
