"""The server's side of a run: results folder, strategy, validation, central evaluation, resume.

Two modes (``federation.mode``). In simulation the server knows the dataset and its partition:
it writes ``partitions.json``, names sites after their shards and can score the global prompt on
the whole test split. In deployment every site's images stay at the site: the server knows only
the class list, names sites as the coordinating centre registered them, and carries on when a
site drops out.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from fedprompt.backbones import Backbone
from fedprompt.config import ConfigError
from fedprompt.config_schema import check_config, check_site_sizes
from fedprompt.data.features import PROCESS_FEATURE_CACHE
from fedprompt.data.protocols import novel_splits, protocol_name, protocol_report
from fedprompt.data.sites import (
    dataset_name,
    load_splits,
    plan_report,
    with_dataset,
    write_site_views,
)
from fedprompt.evaluation.metrics import BaseToNovelMetrics, ClassificationMetrics, Reliability
from fedprompt.evaluation.plots import (
    CONFUSION_PLOT,
    RELIABILITY_PLOT,
    SITE_RELIABILITY_PLOT,
    confusion_heatmap,
    reliability_diagram,
    site_reliability_diagrams,
)
from fedprompt.federation.actor_warmup import ActorWarmUp
from fedprompt.federation.checkpoint import (
    Checkpoint,
    RoundOffset,
    load_strategy_state,
    restore_random_state,
    resumable_checkpoint,
)
from fedprompt.federation.metered_grid import MeteredGrid, SiteDirectory
from fedprompt.federation.run_monitor import DP_LINE_KEYS, CentralEvaluation, RunFailed, RunMonitor
from fedprompt.federation.secure_aggregation import SecAggSettings, SecureAggregationGrid
from fedprompt.federation.site_level_dp import (
    SITE_WEIGHT_KEY,
    SiteLevelStrategy,
    replay_releases,
    site_level_spent,
    wrap_site_level,
)
from fedprompt.federation.site_scores import PER_CLASS_METRICS, SiteClasses, by_class_name
from fedprompt.federation.strategies import build_strategy
from fedprompt.federation.validation import UpdateValidation
from fedprompt.learners import Learner
from fedprompt.privacy.dp_training import privacy_summary
from fedprompt.results import ResultsFolder
from fedprompt.site_rounds import (
    backbone_for,
    build_learner,
    feature_settings,
    open_site,
    personalization_for,
    privacy_mode,
    site_tasks,
    site_train_sizes,
    splits_and_plan,
)
from fedprompt.training import evaluate

DEPLOYMENT_MAX_WEIGHT = 1000.0
NOVEL_KEYS = ("base_accuracy", "novel_accuracy", "harmonic_mean")
"""What ``summary.json``'s ``final`` adds under ``protocol=base_to_novel``."""
LearnerFactory = Callable[[list[str]], Learner]


def output_dir_for(cfg: DictConfig) -> Path:
    """The folder being resumed, else ``output_dir``, else ``runs/<experiment>-<date>-<time>``."""
    if cfg.get("resume"):
        return Path(str(cfg.resume)).expanduser().resolve()
    if cfg.output_dir:
        return Path(str(cfg.output_dir)).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs", f"{cfg.experiment_name}-{stamp}").resolve()


def wait_for_sites(grid: Grid, num_sites: int, timeout: float, min_sites: int | None = None) -> int:
    """Wait for one node per site; return how many are connected.

    Simulation (``min_sites`` None) needs exactly ``num_sites``. Deployment starts once all
    sites are connected (more is fine: every connected site takes part), or at the timeout
    with at least ``min_sites`` of them.

    Raises:
        RuntimeError: The count is wrong (simulation) or too low (deployment), with the fix.
    """
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected == num_sites or (min_sites is not None and connected > num_sites):
            return connected
        late = time.monotonic() > deadline
        if min_sites is not None and late and connected >= min_sites:
            log(
                WARNING,
                "[fedprompt] %d of %d sites are connected after %.0f s; starting without the "
                "others (they join the rounds after they connect).",
                connected,
                num_sites,
                timeout,
            )
            return connected
        if min_sites is not None and late:
            raise RuntimeError(
                f"Only {connected} of the {num_sites} sites connected within {timeout:.0f} s, "
                f"fewer than federation.min_sites={min_sites}; start the missing SuperNodes "
                "(sites/README.md) or lower federation.min_sites."
            )
        if min_sites is None and (connected > num_sites or late):
            raise RuntimeError(
                f"The run expects one SuperNode per site ({num_sites}) but {connected} are "
                f'connected; in simulation pass --federation-config "num-supernodes={num_sites}" '
                "to flwr run (fedprompt simulate does this for you), or set federation.num_sites."
            )
        time.sleep(1.0)


def _site_scores(site: dict[str, Any], classnames: Sequence[str]) -> dict[str, Any]:
    """A site's calibration and per-class values in ``final.per_site``, where it sent them."""
    scores: dict[str, Any] = {}
    if site.get("ece") is not None:
        scores |= {"ece": site["ece"], "brier": site.get("brier")}
    if site.get("sensitivity") is not None or site.get("specificity") is not None:
        scores["per_class"] = {
            name: by_class_name(site.get(name), classnames) for name in PER_CLASS_METRICS
        }
    return scores


def _central_scores(central: dict[str, Any], classnames: Sequence[str]) -> dict[str, Any]:
    """``final``'s calibration, per-class values by class name and confusion matrix (central)."""
    counts = central.get("confusion_matrix")
    return {
        "ece": central.get("ece"),
        "brier": central.get("brier"),
        "per_class": {
            name: by_class_name(central.get(name), classnames) for name in PER_CLASS_METRICS
        },
        "confusion_matrix": (
            {"classnames": list(classnames), "counts": counts} if counts is not None else None
        ),
    }


def _federated_scores(sites: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sites' ECE and Brier score weighted by test size; no pooled per-class values.

    Pooling sensitivity over sites needs each site's images per class, which no site sends, so
    ``per_class`` and ``confusion_matrix`` are None (each site's own are in ``per_site``).
    """
    calibrated = [s for s in sites if s.get("ece") is not None]
    total = sum(s["num_test"] for s in calibrated)
    return {
        key: sum(s[key] * s["num_test"] for s in calibrated) / total if total else None
        for key in ("ece", "brier")
    } | {"per_class": None, "confusion_matrix": None}


def _final_metrics(
    lines: list[dict[str, Any]], classnames: Sequence[str], site_classes: SiteClasses
) -> dict[str, Any]:
    """Central test metrics where measured, else the sites' test metrics weighted by size.

    ``classnames`` names the central evaluation's classes and ``site_classes`` each site's, so
    that per-class values are given by class name.
    """
    last = lines[-1] if lines else None
    if last is None:
        raise RuntimeError("No round completed, so there are no final metrics to report.")
    per_site = {
        name: {"accuracy": site["accuracy"], "num_test": site["num_test"]}
        | (
            {"personalized_accuracy": site["personalized_accuracy"]}
            if site.get("personalized_accuracy") is not None
            else {}
        )
        | _site_scores(site, site_classes(name))
        for name, site in last["sites"].items()
        if site["accuracy"] is not None
    }
    if last["central"]:
        final = {key: last["central"][key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
        final |= {key: last["central"][key] for key in NOVEL_KEYS if key in last["central"]}
        final["source"] = "central"
        final |= _central_scores(last["central"], classnames)
    else:
        sites = [s for s in last["sites"].values() if s["accuracy"] is not None]
        total = sum(s["num_test"] for s in sites) or 1
        final = {
            key: sum(s[key] * s["num_test"] for s in sites) / total
            for key in ("accuracy", "balanced_accuracy", "macro_f1")
        }
        final["source"] = "federated"
        final |= _federated_scores(sites)
    final["federated_accuracy"] = last["federated_accuracy"]
    final["personalized_accuracy"] = last.get("personalized_accuracy")
    final["unseen_site_accuracy"] = last.get("unseen_site_accuracy")
    final["unseen_dataset_accuracy"] = last.get("unseen_datasets")
    for name in last.get("held_out", []):
        if name in per_site:
            per_site[name]["held_out"] = True
    attacks = [s["mia_auc"] for s in last["sites"].values() if s.get("mia_auc") is not None]
    final["mia_auc"] = sum(attacks) / len(attacks) if attacks else None
    final["per_site"] = per_site
    return final


def _site_classes(cfg: DictConfig, learner: Learner) -> SiteClasses:
    """The classes each site scores, by its name.

    Its own dataset's under ``federation.site_datasets``, else the run's (under base-to-novel the
    base classes, which the sites train and test on).
    """
    if not site_tasks(cfg):
        return lambda _site: learner.classnames
    own = {}
    for index in range(len(site_tasks(cfg))):
        data = open_site(cfg, index).data
        own[data.name] = tuple(data.classnames)
    return lambda site: own.get(site, ())


def _write_figures(results: ResultsFolder, line: dict[str, Any], classnames: Sequence[str]) -> None:
    """The last round's figures in the results folder, for a reader who does not read JSON.

    The central evaluation's reliability diagram and confusion matrix (``reliability_diagram.png``,
    ``confusion_matrix.png``) and, where the sites shared their bins
    (``evaluation.share_site_histograms``), each site's (``reliability_diagram_per_site.png``).
    """
    central = line.get("central") or {}
    if central.get("reliability"):
        reliability_diagram(
            Reliability.from_dict(central["reliability"]),
            results.path / RELIABILITY_PLOT,
            title="Central test split, after the last round",
        )
    if central.get("confusion_matrix"):
        confusion_heatmap(
            central["confusion_matrix"],
            classnames,
            results.path / CONFUSION_PLOT,
            title="Central test split, after the last round",
        )
    shared = {
        name: (Reliability.from_dict(site["reliability"]), site.get("ece"))
        for name, site in line["sites"].items()
        if site.get("reliability")
    }
    if shared:
        site_reliability_diagrams(shared, results.path / SITE_RELIABILITY_PLOT)


def _open_results(cfg: DictConfig) -> tuple[ResultsFolder, Checkpoint | None]:
    """A new results folder, or the resumed run's folder with its last checkpoint."""
    if not cfg.get("resume"):
        return ResultsFolder(output_dir_for(cfg)), None
    folder = output_dir_for(cfg)
    checkpoint = resumable_checkpoint(folder, cfg)
    return ResultsFolder(folder, resume=True), checkpoint


def _novel_evaluation(
    cfg: DictConfig, backbone: Backbone, base_learner: Learner
) -> tuple[list[str], Callable[[dict[str, Any]], ClassificationMetrics]]:
    """The dataset's full class list, and a scorer of a base-trained prompt on the novel classes.

    Raises:
        ConfigError: The method's trainable state depends on the class list (a class-specific
            context, a linear probe), so a base-trained prompt cannot score novel classes.
    """
    full = load_splits(cfg)
    novel = novel_splits(full)
    # A class-agnostic state has the same shapes for the base classes and for all classes.
    _class_agnostic(
        cfg,
        base_learner,
        build_learner(cfg, backbone, list(full.classnames)),
        "a prompt trained on the base classes cannot be tested on the novel ones",
        " for protocol=base_to_novel",
    )
    learner = build_learner(cfg, backbone, list(novel.classnames))
    settings = feature_settings(cfg)
    features, labels = PROCESS_FEATURE_CACHE.get(
        backbone,
        novel.test,
        settings.batch_size,
        "novel-class test features",
        normalization=settings.normalization,
    )

    def score(state: dict[str, Any]) -> ClassificationMetrics:
        learner.load_trainable_state(state)
        return evaluate(learner, features, labels, len(novel.classnames))

    return list(full.classnames), score


def _class_agnostic(
    cfg: DictConfig, reference: Learner, other: Learner, consequence: str, where: str = ""
) -> None:
    """Refuse a method whose trainable state depends on the class list.

    ``consequence`` says what that rules out, ``where`` the setting that asks for it.

    Raises:
        ConfigError: The two learners' trainable states differ in keys or shapes.
    """
    shapes = {k: tuple(v.shape) for k, v in other.trainable_state().items()}
    if shapes != {k: tuple(v.shape) for k, v in reference.trainable_state().items()}:
        raise ConfigError(
            f"method={cfg.method.name}'s trainable state depends on the class list, so "
            f"{consequence}; use a class-agnostic method (or method.class_specific=false){where}."
        )


UnseenEvaluation = Callable[[ArrayRecord], dict[str, float]]


def _unseen_datasets(
    cfg: DictConfig, backbone: Backbone, reference: Learner
) -> UnseenEvaluation | None:
    """A scorer of the global prompt on ``evaluation.unseen_datasets``, which no site holds.

    Each dataset's test split is scored with its own class list, the learned context as it is
    (zero-shot transfer of the prompt): accuracy per dataset.

    Raises:
        ConfigError: The method's state depends on the class list, or no such dataset.
    """
    names = [str(name) for name in cfg.evaluation.get("unseen_datasets") or []]
    if not names:
        return None
    settings = feature_settings(cfg)
    scorers = {}
    for name in names:
        other = with_dataset(cfg, name)
        splits = load_splits(other)
        learner = build_learner(other, backbone, list(splits.classnames))
        _class_agnostic(
            cfg, reference, learner, f"one prompt cannot serve the unseen dataset {name}"
        )
        features, labels = PROCESS_FEATURE_CACHE.get(
            backbone,
            splits.test,
            settings.batch_size,
            f"{name} test features",
            normalization=settings.normalization,
        )
        scorers[dataset_name(other)] = (learner, features, labels, len(splits.classnames))

    def score(arrays: ArrayRecord) -> dict[str, float]:
        state = arrays.to_torch_state_dict()
        accuracy = {}
        for name, (learner, features, labels, num_classes) in scorers.items():
            learner.load_trainable_state(state)
            accuracy[name] = evaluate(learner, features, labels, num_classes).accuracy
        return accuracy

    return score


def _simulation_setup(
    cfg: DictConfig, results: ResultsFolder, learner_for: LearnerFactory
) -> tuple[Learner, SiteDirectory, CentralEvaluation | None, list[str]]:
    """The partitioned dataset's learner, site names, central evaluation and full class list.

    Under ``protocol=base_to_novel`` the sites' dataset holds the base classes only, and the
    central evaluation scores the global prompt on the base and on the novel classes.
    """
    backbone = backbone_for(cfg)
    splits, plan = splits_and_plan(cfg)
    results.write_json("partitions.json", plan_report(cfg, splits, plan))
    write_site_views(cfg, splits, plan, results.path)
    learner = learner_for(list(splits.classnames))
    classnames = list(splits.classnames)
    novel = None
    if protocol_name(cfg.get("protocol")) == "base_to_novel":
        classnames, novel = _novel_evaluation(cfg, backbone, learner)
    central = None
    if cfg.evaluation.central:
        settings = feature_settings(cfg)
        features, labels = PROCESS_FEATURE_CACHE.get(
            backbone,
            splits.test,
            settings.batch_size,
            "global test features",
            normalization=settings.normalization,
        )

        def central(arrays: ArrayRecord) -> ClassificationMetrics | BaseToNovelMetrics:
            state = arrays.to_torch_state_dict()
            learner.load_trainable_state(state)
            base = evaluate(learner, features, labels, len(splits.classnames))
            return base if novel is None else BaseToNovelMetrics(base, novel(state))

    return learner, SiteDirectory(plan.site_names), central, classnames


def _tasks_setup(
    cfg: DictConfig, results: ResultsFolder, learner_for: LearnerFactory
) -> tuple[Learner, SiteDirectory, CentralEvaluation | None, list[str]]:
    """Sites with different tasks (``federation.site_datasets``): each holds its own dataset.

    The shared prompt must fit every site's class list, so the method's trainable state may
    not depend on it. There is no one central test split: each site scores its own.

    Raises:
        ConfigError: The method's trainable state depends on the class list.
    """
    tasks = site_tasks(cfg)
    sessions = [open_site(cfg, index) for index in range(len(tasks))]
    learners = [learner_for(list(session.data.classnames)) for session in sessions]
    for name, other in zip(tasks[1:], learners[1:], strict=True):
        _class_agnostic(
            cfg, learners[0], other, f"one prompt cannot serve sites whose tasks differ ({name})"
        )
    results.write_json(
        "partitions.json",
        {
            "scheme": "site_datasets",
            "seed": int(cfg.seed),
            "shots": int(cfg.train.shots),
            "sites": [
                {
                    "name": session.data.name,
                    "dataset": dataset_name(session.cfg),
                    "classnames": list(session.data.classnames),
                    "num_train": len(session.data.train),
                    "num_test": len(session.data.test),
                }
                for session in sessions
            ],
        },
    )
    classnames = [name for session in sessions for name in session.data.classnames]
    names = [session.data.name for session in sessions]
    return learners[0], SiteDirectory(names), None, classnames


def secagg_settings(cfg: DictConfig) -> SecAggSettings | None:
    """SecAgg+'s settings when ``federation.secure_aggregation`` is on.

    ``check_config`` has already refused what SecAgg+ cannot honour (a median or trimmed mean,
    site-level DP, fewer than two sites); this adds Flower's own checks of the protocol's
    parameters and the default ``max_weight``.

    Raises:
        ConfigError: Parameters Flower's ``SecAggPlusWorkflow`` refuses.
    """
    federation = cfg.federation
    if not federation.get("secure_aggregation", False):
        return None
    secagg = federation.secagg
    max_weight = secagg.max_weight
    if max_weight is None and federation.mode == "simulation":
        max_weight = max(site_train_sizes(cfg).values())
    elif max_weight is None:
        max_weight = DEPLOYMENT_MAX_WEIGHT
    try:
        settings = SecAggSettings(
            num_shares=secagg.num_shares,
            reconstruction_threshold=secagg.reconstruction_threshold,
            max_weight=float(max_weight),
            clipping_range=float(secagg.clipping_range),
            quantization_range=int(secagg.quantization_range),
            timeout=float(federation.round_timeout),
        )
        settings.workflow()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"federation.secagg is not usable by Flower's SecAgg+: {err}") from err
    return settings


def _deployment_setup(
    cfg: DictConfig, learner_for: LearnerFactory
) -> tuple[Learner, SiteDirectory, None, list[str]]:
    """Only the class list is known at the server; the sites keep their images."""
    if cfg.dataset.get("classnames") is None:
        raise ConfigError(
            "A deployed federation needs its class list at the server: set dataset.classnames "
            "(or use a dataset config that lists them), and give the sites the same list."
        )
    if cfg.evaluation.central:
        log(INFO, "[fedprompt] deployment: no central test split; sites evaluate on their own.")
    classnames = list(cfg.dataset.classnames)
    return learner_for(classnames), SiteDirectory(trust_reported_names=False), None, classnames


def held_out_sites(cfg: DictConfig, site_names: list[str]) -> list[str]:
    """The sites ``evaluation.holdout_sites`` keeps out of training: the last K of the partition."""
    count = int(cfg.evaluation.get("holdout_sites", 0) or 0)
    return site_names[len(site_names) - count :] if count else []


def _strategy(
    cfg: DictConfig,
    reference: ArrayRecord,
    grid: MeteredGrid,
    min_available: int,
    secure: bool = False,
    held_out: list[str] | None = None,
    site_classes: SiteClasses | None = None,
) -> tuple[Strategy, SiteLevelStrategy | None]:
    """Validation around the configured strategy (inside Flower's DP wrapper for site-level DP).

    Returns the strategy and, under ``privacy=site_level``, the DP wrapper whose accountant
    holds the run's site-level epsilon.
    """
    site_level = privacy_mode(cfg) == "site_level"
    aggregator: Strategy = build_strategy(
        OmegaConf.to_container(cfg.strategy, resolve=True),  # type: ignore[arg-type]
        fraction_train=float(cfg.federation.fraction_train),
        fraction_evaluate=float(cfg.federation.fraction_evaluate),
        min_nodes=int(cfg.federation.min_sites),
        min_available_nodes=min_available,
        weighted_by_key=SITE_WEIGHT_KEY if site_level else "num-examples",
    )
    wrapper = None
    if site_level:
        privacy = OmegaConf.to_container(cfg.privacy, resolve=True)
        assert isinstance(privacy, dict)
        wrapper = wrap_site_level(aggregator, privacy, int(cfg.federation.num_sites))
        aggregator = wrapper
    validation = UpdateValidation(
        aggregator,
        reference,
        max_update_ratio=float(cfg.federation.max_update_ratio),
        site_name=grid.sites.name,
        on_reject=grid.record_rejection,
        on_withhold=grid.record_withheld,
        on_aggregate=grid.record_aggregated,
        secure_sum=secure,
        held_out=held_out or [],
        share_histograms=bool(cfg.evaluation.get("share_site_histograms", False)),
        num_classes=(lambda site: len(site_classes(site))) if site_classes else None,
    )
    return validation, wrapper


def _privacy_summary(cfg: DictConfig, lines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each DP-SGD site's privacy at the end of the run, from the last round it reported it."""
    if privacy_mode(cfg) != "dpsgd":
        return None
    latest: dict[str, dict[str, Any]] = {}
    for line in lines:
        for name, site in line["sites"].items():
            if site.get("dp_epsilon") is not None:
                latest[name] = {metric: site[key] for key, metric in DP_LINE_KEYS.items()}
    accountant = str(cfg.privacy.accountant)
    return {name: privacy_summary(latest[name], accountant) for name in sorted(latest)}


def _write_failure(
    results: ResultsFolder,
    identity: dict[str, Any],
    lines: list[dict[str, Any]],
    reason: str,
    seconds: float,
) -> None:
    """``summary.json`` of a run that stopped: its status and reason, and no final metrics.

    The rounds that did complete stay in ``metrics.jsonl`` and the checkpoint; nothing here
    reports a number as the run's result.
    """
    completed = max((line["round"] for line in lines), default=0)
    results.write_json(
        "summary.json",
        {
            **identity,
            "status": "failed",
            "reason": reason,
            "rounds_completed": completed,
            "final": None,
            "wall_seconds": seconds,
        },
    )
    log(ERROR, "[fedprompt] the run failed after %d rounds: %s", completed, reason)


def run_federation(grid: Grid, cfg: DictConfig, *, warm_up: bool = False) -> dict[str, Any]:
    """Run (or continue) ``federation.rounds`` rounds over the sites' prompts; return a summary.

    ``warm_up`` (a simulation's first run in its actors): the nodes load their backbone while
    this server prepares (``ActorWarmUp``), so round 1 does not wait for their cold start.
    """
    started = time.perf_counter()
    check_config(cfg)
    # The same draws whether this process is fresh or has run other points of a grid before.
    random.seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    mode = str(cfg.federation.mode)
    if mode == "simulation":
        check_site_sizes(cfg, site_train_sizes(cfg))
    warming = ActorWarmUp(grid) if warm_up and mode == "simulation" else None
    secagg = secagg_settings(cfg)
    if site_tasks(cfg):
        dataset = "+".join(dataset_name(with_dataset(cfg, name)) for name in site_tasks(cfg))
    else:
        dataset = dataset_name(cfg) if mode == "simulation" else str(cfg.dataset.name)
    results, checkpoint = _open_results(cfg)
    log(INFO, "[fedprompt] results folder: %s", results.path)
    if not site_tasks(cfg) and dataset != str(cfg.dataset.name):
        log(
            WARNING,
            "[fedprompt] dataset %s: %s's images are absent, so this run trains and tests on "
            "generated images; its numbers say nothing about %s.",
            dataset,
            cfg.dataset.name,
            cfg.dataset.name,
        )
    results.write_config(cfg)
    backbone = backbone_for(cfg)

    def learner_for(classnames: list[str]) -> Learner:
        return build_learner(cfg, backbone, classnames)

    if site_tasks(cfg):
        learner, sites, central, classnames = _tasks_setup(cfg, results, learner_for)
    elif mode == "simulation":
        learner, sites, central, classnames = _simulation_setup(cfg, results, learner_for)
    else:
        learner, sites, central, classnames = _deployment_setup(cfg, learner_for)
    initial_state = learner.trainable_state()
    reference = ArrayRecord(initial_state)
    unseen = _unseen_datasets(cfg, backbone, learner) if mode == "simulation" else None

    num_sites = int(cfg.federation.num_sites)
    min_sites = int(cfg.federation.min_sites)
    connect_timeout = float(cfg.federation.connect_timeout)
    metered = MeteredGrid(grid, sites)
    if mode == "simulation":
        wait_for_sites(metered, num_sites, connect_timeout)
        min_available = num_sites
    else:
        wait_for_sites(metered, num_sites, connect_timeout, min_sites=min_sites)
        min_available = min_sites
    if warming is not None:
        warming.wait(connect_timeout)
    held_out = held_out_sites(cfg, sites.site_names)
    site_classes = _site_classes(cfg, learner)
    strategy, site_level = _strategy(
        cfg, reference, metered, min_available, secagg is not None, held_out, site_classes
    )
    train_grid: Grid = metered
    if secagg is not None:
        log(INFO, "[fedprompt] secure aggregation: Flower's SecAgg+ (the server sees sums only)")
        train_grid = SecureAggregationGrid(metered, secagg, on_halt=metered.record_lost)

    rounds = int(cfg.federation.rounds)
    done, lines, initial, arrays = 0, [], None, reference
    if checkpoint is not None:
        done = checkpoint.round
        lines = results.keep_metrics_through(done)
        initial = checkpoint.initial
        arrays = ArrayRecord(checkpoint.global_state)
        load_strategy_state(strategy, checkpoint.strategy_state)
        restore_random_state(checkpoint.random_state)
        if site_level is not None and lines and lines[-1].get("site_level_privacy"):
            replay_releases(site_level, int(lines[-1]["site_level_privacy"]["releases"]))
        log(INFO, "[fedprompt] resuming after round %d of %d", done, rounds)
        strategy = RoundOffset(strategy, done)
    monitor = RunMonitor(
        results,
        metered,
        rounds,
        central,
        strategy,
        lines,
        round_offset=done,
        initial=initial,
        site_level_privacy=(lambda: site_level_spent(site_level)) if site_level else None,
        roster=[str(name) for name in cfg.federation.get("sites") or []],
        dataset=dataset,
        held_out=held_out,
        unseen_datasets=unseen,
        site_classes=site_classes,
    )
    identity = {
        "experiment": str(cfg.experiment_name),
        "method": str(cfg.method.name),
        "backbone": str(cfg.backbone.name),
        "dataset": dataset,
        "mode": mode,
        "strategy": str(cfg.strategy.name),
        "personalization": personalization_for(cfg).describe(),
        "secure_aggregation": secagg is not None,
        "num_sites": num_sites,
        "rounds": rounds,
        "seed": int(cfg.seed),
    }
    try:
        if rounds > done:
            strategy.start(
                grid=train_grid,
                initial_arrays=arrays,
                num_rounds=rounds - done,
                timeout=float(cfg.federation.round_timeout),
                evaluate_fn=monitor,
            )
    except Exception as err:
        reason = str(err) if isinstance(err, RunFailed) else f"{type(err).__name__}: {err}"
        _write_failure(results, identity, monitor.lines, reason, time.perf_counter() - started)
        raise

    payload = sum(t.numel() * t.element_size() for t in initial_state.values())
    lines = monitor.lines
    summary = {
        **identity,
        "status": "completed",
        "reason": None,
        "protocol": protocol_report(cfg.get("protocol"), int(cfg.train.shots), classnames),
        "resumed_after_round": done if checkpoint is not None else None,
        "final": _final_metrics(lines, learner.classnames, site_classes),
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
        "privacy": _privacy_summary(cfg, lines),
        "site_level_privacy": lines[-1].get("site_level_privacy") if lines else None,
        "wall_seconds": time.perf_counter() - started,
    }
    results.write_json("summary.json", summary)
    _write_figures(results, lines[-1], learner.classnames)
    log(
        INFO,
        "[fedprompt] final %s accuracy %.1f%%; results in %s",
        summary["final"]["source"],
        100 * summary["final"]["accuracy"],
        results.path,
    )
    return summary
