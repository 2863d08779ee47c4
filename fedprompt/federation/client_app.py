"""The Flower ClientApp: one hospital's side of a round, a thin shell over ``local_site``."""

from __future__ import annotations

from logging import ERROR, WARNING

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from omegaconf import DictConfig

from fedprompt.backbones import BackboneUnavailableError
from fedprompt.config import ConfigError
from fedprompt.data.site_check import SiteConfigError
from fedprompt.federation.grid_session import PARTITION_METRIC, GridPlan, point_of
from fedprompt.federation.local_site import (
    PARTITION_KEY,
    NodeSite,
    evaluate_site,
    open_node_site,
    site_label,
    train_site,
)
from fedprompt.federation.run_config import PLAN_KEY, config_from_run_config
from fedprompt.federation.secure_aggregation import secure_aggregation_mod
from fedprompt.federation.site_level_dp import SITE_WEIGHT_KEY, site_level_clipping_mod
from fedprompt.federation.site_scores import reply_metrics
from fedprompt.federation.validation import HELD_OUT_KEY
from fedprompt.privacy.dp_training import DPTrainStats
from fedprompt.site_rounds import backbone_for, privacy_mode
from fedprompt.user_errors import USER_ERRORS

# SecAgg+ outermost: it must see the train reply exactly as the site's handler made it.
app = ClientApp(mods=[secure_aggregation_mod, site_level_clipping_mod])

LEDGER_KEY = "privacy-ledger"
"""The node-state record holding the site's ``SiteLedger`` between rounds."""

LOCAL_KEY = "personal-state"
"""The node-state record holding the site's personalized tensors between rounds."""
LOCAL_ROUND_KEY = "personal-round"
"""The node-state record saying which round those tensors are from."""

# Errors about configuration rather than images: their sentence is safe to send to the server.
SHAREABLE_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    SiteConfigError,
    BackboneUnavailableError,
)


CURRENT_POINT_KEY = "session-point"
"""The node-state record naming the point of a session whose state the node holds."""


def _enter_point(context: Context, index: int) -> None:
    """Start a session's point with a clean node state: nothing of another point carries over."""
    held = context.state.config_records.get(CURRENT_POINT_KEY)
    if held is not None and int(held["index"]) == index:
        return
    for key in list(context.state.keys()):
        del context.state[key]
    context.state[CURRENT_POINT_KEY] = ConfigRecord({"index": index})


def _config(msg: Message, context: Context) -> tuple[DictConfig, bool]:
    """The run's config, or in a session the config of the point ``msg`` belongs to."""
    index = point_of(msg)
    if index is None:
        return config_from_run_config(context.run_config), False
    plan_file = context.run_config.get(PLAN_KEY)
    plan = GridPlan.load(str(plan_file)) if plan_file else None
    points = len(plan.points) if plan else 0
    if plan is None or not 0 <= index < points:
        raise ConfigError(
            f"The message names point {index} of a session, but this run's session plan has "
            f"{points} points; only the server fedprompt started for the session can address them."
        )
    _enter_point(context, index)
    return plan.config(index), True


def _open(msg: Message, context: Context) -> NodeSite:
    cfg, in_session = _config(msg, context)
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    return open_node_site(cfg, context.node_config, in_session=in_session)


def _identity(site: NodeSite) -> dict[str, int]:
    """The simulated site's partition index, by which the server names it (deployment: none)."""
    return {} if site.deployed else {"site-index": site.index}


def _site_weight(site: NodeSite) -> dict[str, int]:
    """Under site-level DP every site weighs the same in the average (``SITE_WEIGHT_KEY``)."""
    return {SITE_WEIGHT_KEY: 1} if privacy_mode(site.cfg) == "site_level" else {}


def local_state(
    site: NodeSite, context: Context, through_round: int
) -> dict[str, torch.Tensor] | None:
    """The site's personalized tensors from its newest round ``<= through_round``.

    The node's state holds the last round's while the SuperNode runs; the site's disk holds
    every round's, so a restarted SuperNode or a resumed run finds them there. None: the site
    has trained no personalized part yet in this run.
    """
    found: list[tuple[int, dict[str, torch.Tensor]]] = []
    if LOCAL_KEY in context.state and LOCAL_ROUND_KEY in context.state:
        kept = int(context.state.config_records[LOCAL_ROUND_KEY]["round"])
        if kept <= through_round:
            found.append((kept, context.state.array_records[LOCAL_KEY].to_torch_state_dict()))
    store = site.local_store(context.run_id)
    on_disk = store.latest(through_round) if store is not None else None
    if on_disk is not None:
        found.append(on_disk)
    return max(found, key=lambda pair: pair[0])[1] if found else None


def keep_local_state(
    site: NodeSite, context: Context, server_round: int, tensors: dict[str, torch.Tensor]
) -> None:
    """Keep the round's personalized tensors in the node's state and on the site's disk."""
    store = site.local_store(context.run_id)
    if store is not None:
        store.save(server_round, tensors)
    context.state[LOCAL_KEY] = ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})
    context.state[LOCAL_ROUND_KEY] = ConfigRecord({"round": server_round})


def refusal(msg: Message, context: Context, err: Exception) -> Message:
    """An error reply that names the site, so the server can record who dropped out and why.

    The reason starts with the site's name in brackets (``[hospital-b] ...``); the server reads
    it back for a site that never delivered a result. A problem with the site's images is
    described by its kind only: file and folder names can carry patient identifiers, so the
    full sentence goes to the site's own log and never leaves the site.
    """
    name = site_label(context.node_config)
    log(ERROR, "[fedprompt] site %s cannot take part in this round: %s", name, err)
    if isinstance(err, SHAREABLE_ERRORS):
        reason = f"[{name}] {err}"
    else:
        reason = (
            f"[{name}] {type(err).__name__}: the site's data cannot be used; the site's "
            "SuperNode log says which file and what to do."
        )
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global prompt on this site's images and send back its tensors only.

    Only the global part travels: a personalization scheme's local tensors are kept in the
    node's state and on the site's disk (``keep_local_state``), never in the reply. A held-out
    site (``evaluation.holdout_sites``) trains nothing and answers with ``held-out`` only.

    Under ``privacy=dpsgd`` the site's ledger lives in the node's state between rounds (and on
    disk beside its checkpoint); the reply then carries the privacy spent (``dp-*``) and no
    training loss, which the DP guarantee does not cover. A site whose budget is spent says so
    (``dp-budget-exhausted``) and the server leaves its reply out of the aggregate.
    """
    try:
        site = _open(msg, context)
        if site.held_out:
            # An unseen hospital: it sends neither tensors nor its number of images.
            values = {"num-examples": 0, **_identity(site), HELD_OUT_KEY: 1}
            return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
        config = msg.content["config"]
        server_round = int(config["server-round"])
        saved = context.state.config_records.get(LEDGER_KEY)
        update, ledger = train_site(
            site,
            msg.content["arrays"].to_torch_state_dict(),
            server_round,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            ledger_state=dict(saved) if saved is not None else None,
            local_state=local_state(site, context, server_round - 1),
        )
        if update.local_state is not None:
            keep_local_state(site, context, server_round, update.local_state)
    except USER_ERRORS as err:
        return refusal(msg, context, err)
    state, stats = update.global_state, update.stats
    if ledger is not None:
        context.state[LEDGER_KEY] = ConfigRecord(ledger.to_dict())
    if site.releases is not None:
        site.releases.record(context.run_id, server_round, stats.num_examples)
    values: dict[str, float | int] = {
        "num-examples": stats.num_examples,
        **_identity(site),
        **_site_weight(site),
        "train-steps": stats.steps,
        "train-seconds": stats.seconds,
    }
    if isinstance(stats, DPTrainStats):
        values.update(stats.metrics())
        if stats.budget_exhausted:
            log(
                WARNING,
                "[fedprompt] site %s stops training: one more round would take its epsilon "
                "past privacy.epsilon=%s (spent %.3f).",
                site.name,
                ledger.target_epsilon if ledger is not None else "?",
                stats.epsilon,
            )
    else:
        values["train-loss"] = stats.loss
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(values)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """A session's opening question: which partition this node serves.

    The node also loads the first point's backbone meanwhile, so that the actors are warm when
    the first round starts.
    """
    try:
        cfg, _ = _config(msg, context)
        backbone_for(cfg)
        partition = int(context.node_config[PARTITION_KEY])
    except (*USER_ERRORS, KeyError) as err:
        return refusal(msg, context, err)
    metrics = MetricRecord({PARTITION_METRIC: partition})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global prompt on this site's own test images.

    Under a personalization scheme the site also scores its own prompt and sends that one
    scalar (``personalized-accuracy``); its local tensors stay here. The scores are scalars,
    key by key in ``site_scores``: accuracy, calibration, per-class sensitivity and specificity,
    and per-bin counts only where the run asks (``evaluation.share_site_histograms``). A site
    without test images answers ``num-examples`` 0 and no scores (an accuracy of 0 would be a
    made-up number); the server records it as having no test images.
    """
    try:
        site = _open(msg, context)
        server_round = int(msg.content["config"]["server-round"])
        result = evaluate_site(
            site,
            msg.content["arrays"].to_torch_state_dict(),
            local_state(site, context, server_round),
        )
    except USER_ERRORS as err:
        return refusal(msg, context, err)
    values: dict[str, float | int] = {
        "num-examples": result.metrics.num_test,
        **_identity(site),
        **_site_weight(site),
    }
    if result.metrics.num_test:
        share = bool(site.cfg.evaluation.get("share_site_histograms", False))
        values.update(reply_metrics(result.metrics, share_histograms=share))
    if result.personalized is not None and not site.held_out:
        values["personalized-accuracy"] = result.personalized.accuracy
    if result.mia_auc is not None:
        values["mia-auc"] = result.mia_auc
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
