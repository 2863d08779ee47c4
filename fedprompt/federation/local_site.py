"""A SuperNode's own site (a simulated shard or a hospital's data folder) and its round's work.

In simulation a node is site ``partition-id`` of a partitioned dataset. In deployment a node's
``--node-config`` names its site config file (``site-config="/etc/fedprompt/site.yaml"``), and the
site's images are all its own: no partition, its whole test split.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedprompt.config import ConfigError
from fedprompt.data.partition import SitePartition
from fedprompt.data.site_check import (
    SiteConfig,
    check_federation_classnames,
    load_site_config,
    site_dataset_config,
)
from fedprompt.data.sites import site_data
from fedprompt.personalization.local_store import LocalStore
from fedprompt.privacy.ledger import SiteLedger
from fedprompt.site_rounds import (
    RoundUpdate,
    SiteEvaluation,
    SiteSession,
    backbone_for,
    evaluate_round,
    evaluate_session,
    plan_ledger,
    splits_and_plan,
    train_round,
)

SITE_CONFIG_KEY = "site-config"
PARTITION_KEY = "partition-id"


@dataclass(frozen=True)
class NodeSite:
    """The site a node serves.

    Attributes:
        name: ``site-<k>`` in simulation, the site config's ``site_name`` in deployment.
        cfg: The run's config as this site sees it: in deployment, its own dataset (one site
            holding all of it), device, backbone copy, and a seed of its own derived from the
            federation's seed and its name.
        index: The site's index in ``cfg``'s partition (deployment: 0, the only site).
        deployed: Whether this is a hospital's own data rather than a simulated shard.
        state_dir: The site's own folder for what must outlive a round, a run and a server
            restart (deployment: the site config's ``state_dir``; simulation:
            ``<output_dir>/sites/<name>``); None when there is none. Nothing in it leaves the
            site.
    """

    name: str
    cfg: DictConfig
    index: int
    deployed: bool
    state_dir: Path | None

    @property
    def held_out(self) -> bool:
        """Whether this simulated site is held out: it never trains, it only scores.

        The last ``evaluation.holdout_sites`` sites of the partition are the unseen hospitals.
        """
        holdout = int(self.cfg.evaluation.get("holdout_sites", 0) or 0)
        return not self.deployed and self.index >= int(self.cfg.federation.num_sites) - holdout

    @property
    def releases(self) -> ReleaseLog | None:
        """The log of every update this site sent, where the site has a state folder."""
        return ReleaseLog(self.state_dir / "releases.json") if self.state_dir else None

    @property
    def privacy_ledger_path(self) -> Path | None:
        """Where the site's privacy ledger is kept between rounds, runs and restarts.

        Under ``privacy=dpsgd`` the site's ``SiteLedger`` is loaded from here before the site
        trains and saved here after (``train_site``), so a resumed run never forgets budget
        already spent.
        """
        return self.state_dir / "privacy_ledger.json" if self.state_dir else None

    def local_store(self, run_id: int) -> LocalStore | None:
        """Where the site keeps its personalized tensors for this run, round by round.

        One folder per run lineage under the state folder: the results folder's name, which a
        resumed run shares with the run it continues (``run-<id>`` where the run names none).
        """
        if self.state_dir is None:
            return None
        lineage = self.cfg.get("resume") or self.cfg.get("output_dir") or f"run-{run_id}"
        return LocalStore(self.state_dir / "personalization" / Path(str(lineage)).name)


class ReleaseLog:
    """The site's local record of every update it sent (run, round, images), across runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        """Every recorded release, oldest first."""
        if not self.path.exists():
            return []
        return list(json.loads(self.path.read_text(encoding="utf-8"))["releases"])

    def record(self, run_id: int, server_round: int, num_examples: int) -> None:
        """Append one sent update; written atomically, so a crash never leaves half a file."""
        releases = [
            *self.entries(),
            {"run_id": run_id, "round": server_round, "num_examples": num_examples},
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"releases": releases}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def simulated_index(
    cfg: DictConfig, node_config: Mapping[str, Any], *, in_session: bool = False
) -> int:
    """This node's site in simulation: its ``partition-id``, checked against the config.

    In a session of many points (``grid_session``) the simulation has as many nodes as the
    largest point has sites; a point only ever messages the nodes of its own sites.
    """
    num_partitions = int(node_config.get("num-partitions", cfg.federation.num_sites))
    index = int(node_config[PARTITION_KEY])
    if in_session and index < int(cfg.federation.num_sites) <= num_partitions:
        return index
    if num_partitions != int(cfg.federation.num_sites):
        raise ValueError(
            f"The federation has {num_partitions} nodes but federation.num_sites is "
            f"{cfg.federation.num_sites}; set them equal "
            f"(--federation-config num-supernodes={cfg.federation.num_sites})."
        )
    return index


def deployed_config(cfg: DictConfig, site: SiteConfig) -> DictConfig:
    """The run's config with this site's own dataset, device and backbone copy.

    Raises:
        ConfigError: The federation names no class list.
        SiteConfigError: The site's class list differs from the federation's.
    """
    if cfg.dataset.get("classnames") is None:
        raise ConfigError(
            "A deployed federation must fix its class list: set dataset.classnames (or use a "
            "dataset config that lists them) on the server."
        )
    check_federation_classnames(site, list(cfg.dataset.classnames))
    local = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(local, dict)
    local["dataset"] = site_dataset_config(site)
    local["device"] = site.device
    local["federation"]["num_sites"] = 1
    local["partition"] = {"name": "iid"}
    local["seed"] = int(
        np.random.SeedSequence([int(cfg.seed), zlib.crc32(site.name.encode())]).generate_state(1)[0]
    )
    if site.backbone_path is not None and local["backbone"]["name"] == "local_dir":
        local["backbone"]["path"] = str(site.backbone_path)
        local["backbone"]["spec"] = f"local-dir:{site.backbone_path}"
    out = OmegaConf.create(local)
    OmegaConf.set_readonly(out, True)
    return out


def _deployed_site(cfg: DictConfig, config_path: str) -> NodeSite:
    site = load_site_config(config_path)
    return NodeSite(site.name, deployed_config(cfg, site), 0, True, site.state_dir)


def open_node_site(
    cfg: DictConfig, node_config: Mapping[str, Any], *, in_session: bool = False
) -> NodeSite:
    """The site this node serves, from its node config (``in_session``: see ``simulated_index``).

    Raises:
        ConfigError: A deployed node without a site config.
        ValueError: A simulated node without a partition id, or with the wrong node count.
    """
    if cfg.federation.mode == "deployment":
        if SITE_CONFIG_KEY not in node_config:
            raise ConfigError(
                "This SuperNode has no site config; start it with sites/start-supernode.sh, or "
                f"with --node-config '{SITE_CONFIG_KEY}=\"/path/to/site.yaml\"'."
            )
        return _deployed_site(cfg, str(node_config[SITE_CONFIG_KEY]))
    if PARTITION_KEY not in node_config:
        raise ValueError(
            "This node has no partition-id in its node config; start it with "
            "--node-config 'partition-id=<k> num-partitions=<n>', or run the federation with "
            "federation.mode=deployment."
        )
    index = simulated_index(cfg, node_config, in_session=in_session)
    name = f"site-{index}"
    state_dir = Path(str(cfg.output_dir), "sites", name) if cfg.output_dir else None
    return NodeSite(name, cfg, index, False, state_dir)


def site_label(node_config: Mapping[str, Any]) -> str:
    """The site's name for messages, found without loading anything that might be broken."""
    if PARTITION_KEY in node_config:
        return f"site-{int(node_config[PARTITION_KEY])}"
    if SITE_CONFIG_KEY in node_config:
        path = str(node_config[SITE_CONFIG_KEY])
        try:
            return load_site_config(path).name
        except ValueError:
            return Path(path).stem
    return "unnamed site"


def train_site(
    site: NodeSite,
    global_state: Mapping[str, torch.Tensor | np.ndarray],
    server_round: int,
    proximal_mu: float = 0.0,
    ledger_state: Mapping[str, Any] | None = None,
    local_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[RoundUpdate, SiteLedger | None]:
    """Train the global prompt on the site's images; return the round's update and the ledger.

    ``site_rounds.train_round`` does the work. Under ``privacy=dpsgd`` the site's ledger is the
    one kept in the node's state (``ledger_state``) or beside its checkpoint
    (``privacy_ledger_path``), whichever has spent more, else a newly planned one; it is saved
    back to that file before the update leaves the site, so a crash can only over-count.
    ``local_state`` is the site's personalized part from its previous round.
    """
    path = site.privacy_ledger_path
    ledger = plan_ledger(site.cfg, site.index, state=ledger_state, path=path)
    update = train_round(
        site.cfg,
        site.index,
        global_state,
        server_round,
        proximal_mu=proximal_mu,
        ledger=ledger,
        local_state=local_state,
    )
    if ledger is not None and path is not None:
        ledger.save(path)
    return update, ledger


def evaluate_site(
    site: NodeSite,
    global_state: Mapping[str, torch.Tensor | np.ndarray],
    local_state: Mapping[str, torch.Tensor] | None = None,
) -> SiteEvaluation:
    """Scores of the global prompt (and the site's own) on the site's own test images.

    A hospital scores on all of its test images; a simulated site on its shard's.
    """
    if not site.deployed:
        return evaluate_round(site.cfg, site.index, global_state, local_state)
    splits, _ = splits_and_plan(site.cfg)
    whole = SitePartition(
        site_names=[site.name],
        train=[np.arange(len(splits.train))],
        test=[np.arange(len(splits.test))],
    )
    data = site_data(site.cfg, splits, whole, 0)
    session = SiteSession(site.cfg, backbone_for(site.cfg), data)
    return evaluate_session(session, global_state, local_state)
