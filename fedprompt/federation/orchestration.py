"""The server's side of a run: set up the results folder, the strategy and central evaluation."""

from __future__ import annotations

import time
from datetime import datetime
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from omegaconf import DictConfig

from fedprompt.data.features import PROCESS_FEATURE_CACHE
from fedprompt.data.sites import plan_report
from fedprompt.evaluation.metrics import ClassificationMetrics
from fedprompt.federation.metered_grid import MeteredGrid
from fedprompt.federation.run_monitor import RunMonitor
from fedprompt.results import ResultsFolder
from fedprompt.site_rounds import backbone_for, build_learner, splits_and_plan
from fedprompt.training import evaluate


def output_dir_for(cfg: DictConfig) -> Path:
    """``output_dir``, or ``runs/<experiment>-<date>-<time>`` under the current folder."""
    if cfg.output_dir:
        return Path(str(cfg.output_dir)).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs", f"{cfg.experiment_name}-{stamp}").resolve()


def wait_for_sites(grid: Grid, num_sites: int, timeout: float) -> None:
    """Wait until one node per site has connected; stop with the fix when the count is wrong."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected == num_sites:
            return
        if connected > num_sites or time.monotonic() > deadline:
            raise RuntimeError(
                f"The run expects one SuperNode per site ({num_sites}) but {connected} are "
                f'connected; in simulation pass --federation-config "num-supernodes={num_sites}" '
                "to flwr run (fedprompt simulate does this for you), or set federation.num_sites."
            )
        time.sleep(1.0)


def _final_metrics(monitor: RunMonitor) -> dict[str, Any]:
    """Central test metrics where measured, else the sites' test metrics weighted by size."""
    last = monitor.lines[-1] if monitor.lines else None
    if last is None:
        raise RuntimeError("No round completed, so there are no final metrics to report.")
    per_site = {
        name: {"accuracy": site["accuracy"], "num_test": site["num_test"]}
        for name, site in last["sites"].items()
        if site["accuracy"] is not None
    }
    if last["central"]:
        final = {key: last["central"][key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
        final["source"] = "central"
    else:
        sites = [s for s in last["sites"].values() if s["accuracy"] is not None]
        total = sum(s["num_test"] for s in sites) or 1
        final = {
            key: sum(s[key] * s["num_test"] for s in sites) / total
            for key in ("accuracy", "balanced_accuracy", "macro_f1")
        }
        final["source"] = "federated"
    final["federated_accuracy"] = last["federated_accuracy"]
    final["per_site"] = per_site
    return final


def run_federation(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run ``federation.rounds`` rounds of FedAvg over the sites' prompts; return the summary."""
    started = time.perf_counter()
    results = ResultsFolder(output_dir_for(cfg))
    log(INFO, "[fedprompt] results folder: %s", results.path)
    results.write_config(cfg)
    backbone = backbone_for(cfg)
    splits, plan = splits_and_plan(cfg)
    results.write_json("partitions.json", plan_report(cfg, splits, plan))
    learner = build_learner(cfg, backbone, list(splits.classnames))
    initial_state = learner.trainable_state()

    central = None
    if cfg.evaluation.central:
        features, labels = PROCESS_FEATURE_CACHE.get(
            backbone, splits.test, int(cfg.evaluation.batch_size), "global test features"
        )

        def central(arrays: ArrayRecord) -> ClassificationMetrics:
            learner.load_trainable_state(arrays.to_torch_state_dict())
            return evaluate(learner, features, labels, len(splits.classnames))

    num_sites = int(cfg.federation.num_sites)
    wait_for_sites(grid, num_sites, float(cfg.federation.connect_timeout))
    metered = MeteredGrid(grid)
    monitor = RunMonitor(results, metered, plan.site_names, int(cfg.federation.rounds), central)
    strategy = FedAvg(
        fraction_train=float(cfg.federation.fraction_train),
        fraction_evaluate=float(cfg.federation.fraction_evaluate),
        min_train_nodes=int(cfg.federation.min_sites),
        min_evaluate_nodes=int(cfg.federation.min_sites),
        min_available_nodes=num_sites,
    )
    strategy.start(
        grid=metered,
        initial_arrays=ArrayRecord(initial_state),
        num_rounds=int(cfg.federation.rounds),
        evaluate_fn=monitor,
    )

    payload = sum(t.numel() * t.element_size() for t in initial_state.values())
    lines = monitor.lines
    summary = {
        "experiment": str(cfg.experiment_name),
        "method": str(cfg.method.name),
        "backbone": str(cfg.backbone.name),
        "dataset": str(cfg.dataset.name),
        "num_sites": num_sites,
        "rounds": int(cfg.federation.rounds),
        "seed": int(cfg.seed),
        "final": _final_metrics(monitor),
        "initial": monitor.initial,
        "communication": {
            "trainable_parameters": learner.num_trainable(),
            "backbone_parameters": backbone.num_parameters(),
            "bytes_up_per_round": round(sum(x["bytes_up"] for x in lines) / len(lines)),
            "bytes_down_per_round": round(sum(x["bytes_down"] for x in lines) / len(lines)),
            "payload_bytes_per_message": payload,
            "backbone_bytes": sum(
                p.numel() * p.element_size() for p in backbone.model.parameters()
            ),
        },
        "privacy": None,
        "wall_seconds": time.perf_counter() - started,
    }
    results.write_json("summary.json", summary)
    log(
        INFO,
        "[fedprompt] final %s accuracy %.1f%%; results in %s",
        summary["final"]["source"],
        100 * summary["final"]["accuracy"],
        results.path,
    )
    return summary
