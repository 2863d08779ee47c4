"""The Flower ClientApp: one hospital's side of a round, a thin shell over ``site_rounds``."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedprompt.federation.run_config import config_from_run_config
from fedprompt.site_rounds import evaluate_round, train_round

# Flower prints through its own handler. Without a handler on the root logger, the first library
# call of logging.warning() (open_clip does this) installs a console handler there, and every
# Flower line is printed twice.
logging.getLogger().addHandler(logging.NullHandler())

app = ClientApp()


def _site_index(context: Context, cfg: DictConfig) -> int:
    """This node's site: its ``partition-id`` in simulation, checked against the config."""
    if "partition-id" not in context.node_config:
        raise ValueError(
            "This node has no partition-id in its node config; start it with "
            "--node-config 'partition-id=<k> num-partitions=<n>'."
        )
    num_partitions = int(context.node_config.get("num-partitions", cfg.federation.num_sites))
    if num_partitions != int(cfg.federation.num_sites):
        raise ValueError(
            f"The federation has {num_partitions} nodes but federation.num_sites is "
            f"{cfg.federation.num_sites}; set them equal "
            f"(--federation-config num-supernodes={cfg.federation.num_sites})."
        )
    return int(context.node_config["partition-id"])


def _setup(context: Context) -> tuple[DictConfig, int]:
    cfg = config_from_run_config(context.run_config)
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    return cfg, _site_index(context, cfg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global prompt on this site's images and send back its tensors only."""
    cfg, site = _setup(context)
    global_state = msg.content["arrays"].to_torch_state_dict()
    server_round = int(msg.content["config"]["server-round"])
    state, stats = train_round(cfg, site, global_state, server_round)
    metrics = MetricRecord(
        {
            "num-examples": stats.num_examples,
            "site-index": site,
            "train-loss": stats.loss,
            "train-steps": stats.steps,
            "train-seconds": stats.seconds,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global prompt on this site's own test images."""
    cfg, site = _setup(context)
    result = evaluate_round(cfg, site, msg.content["arrays"].to_torch_state_dict())
    metrics = MetricRecord(
        {
            "num-examples": result.num_test,
            "site-index": site,
            "accuracy": result.accuracy,
            "balanced-accuracy": result.balanced_accuracy,
            "macro-f1": result.macro_f1,
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
