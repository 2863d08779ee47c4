"""Secure aggregation with Flower's SecAgg+: the server learns the sum of the sites' prompts only.

Flower 1.41 ships SecAgg+ as a server workflow on the legacy path (``SecAggPlusWorkflow``, which
drives a legacy ``Strategy`` through a ``LegacyContext``) and a client mod (``secaggplus_mod``,
which wraps a ClientApp that answers legacy ``FitIns`` with a ``FitRes``). fedprompt's apps speak
the Message API, so this module bridges the two, and writes no cryptography of its own:

- Server: ``SecureAggregationGrid`` wraps the run's grid. When the Message-API strategy sends a
  round's train messages, it runs Flower's workflow over those nodes instead (four exchanges:
  setup, share keys, collect masked vectors, unmask), and answers the strategy with one reply per
  site that delivered, each carrying the unmasked *sum* and that site's scalar metrics, the way
  Flower's own workflow hands every ``FitRes`` the aggregate. The server's code never holds a
  single site's tensors.
- Sites: ``secure_aggregation_mod`` hands SecAgg+ messages to Flower's ``secaggplus_mod`` and
  translates between its legacy ``FitIns``/``FitRes`` and fedprompt's train handler. Flower's mod
  pre-scales each site's tensors by its example count (divided by ``max_weight``) before
  quantizing and masking them, so the unmasked sum divided by the summed weights is FedAvg.

Whatever the server does with the sum (FedAvg, FedProx, FedAdam) is unchanged. Per-site
update checks (norms, medians, trimmed means) are impossible: the server never sees an update.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedprompt.data.site_check import SiteConfigError, load_site_config
from fedprompt.federation.grid_wrapper import GridWrapper
from fedprompt.federation.local_site import SITE_CONFIG_KEY
from fedprompt.federation.validation import BUDGET_EXHAUSTED_KEY

ARRAY_KEYS = "fedprompt.array-keys"
"""FitIns config: the tensors' names as a JSON list (legacy configs hold scalars only), in the
order of the legacy parameter list."""
CLIPPING_RANGE = "fedprompt.secagg-clipping-range"
MAX_WEIGHT = "fedprompt.secagg-max-weight"

# Flower's legacy workflows keep the round and the global parameters under these names.
_WORKFLOW_CONFIG = "config"
_WORKFLOW_PARAMETERS = "parameters"


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+'s parameters (``federation.secagg.*``), as ``SecAggPlusWorkflow`` takes them.

    Attributes:
        num_shares: Shares of each site's secrets: an int, or a float as the fraction of the
            round's sites (1.0: every site holds a share of every other site's secrets).
        reconstruction_threshold: Shares needed to rebuild a secret (int, or float fraction of
            ``num_shares``); fewer colluding sites than this learn nothing.
        max_weight: The largest example count a site may weigh in with; each site scales its
            tensors by ``count / max_weight`` before quantizing, so a smaller bound is more exact.
        clipping_range: Tensor values must lie in ``[-clipping_range, clipping_range]``.
        quantization_range: Integer levels each value is quantized to.
        timeout: Seconds each of the four exchanges waits for replies.
    """

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.67
    max_weight: float = 1000.0
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    timeout: float | None = None

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ workflow with these settings."""
        return DropoutTolerantSecAggPlus(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            timeout=self.timeout,
        )


class DropoutTolerantSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, forgetting sites that drop out before they share their keys.

    In Flower 1.41 the workflow keeps every site it sampled in the set whose masks the unmask
    stage removes. A site that failed the setup or key-sharing stage (a hospital offline when
    the round began) never shared its keys, so no other site holds a share of its secret: the
    unmask stage then asks the others for shares they do not have, and the whole round halts.
    Such a site never entered any other site's masks either, so the sum does not need it: after
    each of those two stages, the sampled set and every neighbourhood keep only the sites that
    answered. A site that drops out later, after its masks entered the others' vectors, is
    still removed by the protocol's own reconstruction from the others' shares.
    """

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's setup stage; then only the sites that answered stay in the protocol."""
        super().setup_stage(grid, context, state)
        return self._forget_dropped(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's key-sharing stage; then only the sites that shared keys stay."""
        super().share_keys_stage(grid, context, state)
        return self._forget_dropped(state)

    def _forget_dropped(self, state: Any) -> bool:
        """Keep only the sites that answered; whether enough remain to go on."""
        answered = set(state.active_node_ids)
        if not state.nid_to_neighbours or len(answered) < 2:
            return False  # nothing sampled, or too few sites left to hide one in a sum
        state.sampled_node_ids = answered
        state.nid_to_neighbours = {
            node: neighbours & answered
            for node, neighbours in state.nid_to_neighbours.items()
            if node in answered
        }
        return self._check_threshold(state)


class _RoundStrategy(LegacyStrategy):
    """The legacy strategy Flower's workflow drives for one round.

    It hands the workflow the instructions the Message-API strategy already chose, and keeps
    what the workflow passes to ``aggregate_fit``: each delivering site's ``FitRes``, whose
    parameters Flower has replaced by the unmasked sum.
    """

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Not used: the global prompt comes with the round's messages."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The round's instructions, as the Message-API strategy sampled them."""
        return self.instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Keep the results; the Message-API strategy aggregates them."""
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Not used: evaluation goes through the Message API."""
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Any]]:
        """Not used: evaluation goes through the Message API."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Any]] | None:
        """Not used: central evaluation is the run monitor's."""
        return None


def _fitins(message: Message, settings: SecAggSettings) -> tuple[FitIns, list[str]]:
    """A Message-API train message as legacy ``FitIns``, with the tensor names in its config."""
    arrays = message.content.array_records["arrays"]
    keys = list(arrays)
    config: dict[str, Any] = dict(message.content.config_records.get("config", ConfigRecord()))
    config[ARRAY_KEYS] = json.dumps(keys)
    config[CLIPPING_RANGE] = float(settings.clipping_range)
    config[MAX_WEIGHT] = float(settings.max_weight)
    parameters = ndarrays_to_parameters([arrays[key].numpy() for key in keys])
    return FitIns(parameters=parameters, config=config), keys


class SecureAggregationGrid(GridWrapper):
    """A grid whose train round runs Flower's SecAgg+ over the sampled sites.

    Args:
        grid: The run's grid (metered: every protocol message is counted per site).
        settings: SecAgg+'s parameters.
        on_halt: Told ``(node_ids, reason)`` when the protocol stops without a sum (too few sites
            answered a stage), so the round's record names the sites whose work was lost.
    """

    def __init__(
        self,
        grid: Grid,
        settings: SecAggSettings,
        on_halt: Callable[[Sequence[int], str], None] | None = None,
    ) -> None:
        super().__init__(grid)
        self.settings = settings
        self.on_halt = on_halt

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Train messages go through SecAgg+; every other message is delegated."""
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        return self._secure_round(messages)

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        """Run SecAgg+ for one round; one reply per delivering site, each holding the sum."""
        by_node = {m.metadata.dst_node_id: m for m in messages}
        instructions, keys = [], []
        for node_id, message in by_node.items():
            fitins, keys = _fitins(message, self.settings)
            proxy = GridClientProxy(node_id, self._grid, self.run.run_id)
            instructions.append((proxy, fitins))
        reference = messages[0].content.array_records["arrays"]
        strategy = _RoundStrategy(instructions)
        config = messages[0].content.config_records.get("config", ConfigRecord())
        server_round = int(config.get("server-round", 0))
        state = RecordDict(
            {
                _WORKFLOW_CONFIG: ConfigRecord({"current_round": server_round}),
                _WORKFLOW_PARAMETERS: ArrayRecord(),
            }
        )
        context = LegacyContext(
            Context(run_id=self.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
            strategy=strategy,
        )
        self.settings.workflow()(self._grid, context)
        if not strategy.results:
            reason = "secure aggregation halted: too few sites answered a SecAgg+ stage"
            log(WARNING, "[fedprompt] round %d: %s; nothing is aggregated.", server_round, reason)
            if self.on_halt is not None:
                self.on_halt(sorted(by_node), reason)
            return []
        total = parameters_to_ndarrays(strategy.results[0][1].parameters)
        summed = {
            key: Array(np.asarray(value).astype(reference[key].dtype).reshape(reference[key].shape))
            for key, value in zip(keys, total, strict=True)
        }
        log(INFO, "[fedprompt] SecAgg+: summed %d sites' masked prompts", len(strategy.results))
        replies = []
        for proxy, fitres in strategy.results:
            metrics = {
                key: value
                for key, value in fitres.metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            content = RecordDict({"arrays": ArrayRecord(summed), "metrics": MetricRecord(metrics)})
            replies.append(Message(content, reply_to=by_node[proxy.node_id]))
        return replies


def _is_secure_round(message: Message) -> bool:
    return (
        message.metadata.message_type == MessageType.TRAIN
        and message.has_content()
        and RECORD_KEY_CONFIGS in message.content.config_records
    )


class SiteRefusedRound(Exception):
    """The site's train handler refused the round; its error reply is kept for the server."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def _as_message_api(message: Message) -> tuple[Message, list[str], float, float]:
    """The legacy ``FitIns`` of a SecAgg+ message as fedprompt's train message."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = dict(fitins.config)
    keys = [str(key) for key in json.loads(str(config.pop(ARRAY_KEYS)))]
    clipping_range = float(config.pop(CLIPPING_RANGE))
    max_weight = float(config.pop(MAX_WEIGHT))
    arrays = ArrayRecord(
        {
            key: Array(value)
            for key, value in zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True)
        }
    )
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    plain = Message(metadata=message.metadata, content=content)
    return plain, keys, clipping_range, max_weight


def _as_fitres(
    reply: Message, keys: list[str], clipping_range: float, max_weight: float
) -> Message:
    """The site's train reply as the legacy ``FitRes`` that Flower's mod masks.

    The weight Flower's mod scales the tensors by is the site's example count, or zero for a
    DP-SGD site whose budget is spent (its unchanged prompt must not count as a vote).

    Raises:
        ValueError: The tensors do not fit SecAgg+'s clipping range, or the example count
            exceeds ``max_weight``: quantizing would silently clip them and corrupt the sum.
    """
    arrays = reply.content.array_records["arrays"]
    metrics = dict(next(iter(reply.content.metric_records.values())))
    if set(arrays) != set(keys):
        raise ValueError(f"the site's tensors {sorted(arrays)} are not the prompt's {keys}")
    values = [arrays[key].numpy() for key in keys]
    largest = max((float(np.abs(v).max()) for v in values if v.size), default=0.0)
    if not math.isfinite(largest) or largest > clipping_range:
        raise ValueError(
            f"a prompt value of magnitude {largest:.4g} lies outside SecAgg+'s clipping range "
            f"(federation.secagg.clipping_range={clipping_range:g}); raise it."
        )
    count = int(metrics["num-examples"])
    if count > max_weight:
        raise ValueError(
            f"the site's {count} training examples exceed federation.secagg.max_weight="
            f"{max_weight:g}; raise it to at least the largest site's example count."
        )
    weight = 0 if metrics.get(BUDGET_EXHAUSTED_KEY, 0) == 1 else count
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(values),
        num_examples=weight,
        metrics=metrics,
    )
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    # The site's scalar metrics, under fedprompt's own name, for the round's record.
    content["metrics"] = MetricRecord(metrics)
    return Message(metadata=reply.metadata, content=content)


def _refuses_plain_training(node_config: Mapping[str, Any]) -> str | None:
    """The site's name when its site config sets ``require_secure_aggregation: true``."""
    path = node_config.get(SITE_CONFIG_KEY)
    if not path:
        return None
    site = load_site_config(str(path))
    return site.name if site.require_secure_aggregation else None


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer SecAgg+ messages with Flower's ``secaggplus_mod``; pass any other message on.

    Flower's mod asks the wrapped app for a ``FitRes`` in the collect-masked-vectors stage;
    this mod translates fedprompt's train message and reply in both directions. A site that
    refuses the round (its data cannot be used) answers with its own error reply, as it does
    without SecAgg+. A hospital whose site config requires secure aggregation answers a plain
    train message with an error, so a server cannot ask it for its prompt alone.
    """
    if not _is_secure_round(msg):
        if msg.metadata.message_type == MessageType.TRAIN:
            try:
                name = _refuses_plain_training(ctxt.node_config)
            except SiteConfigError as err:
                return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg)
            if name is not None:
                reason = (
                    f"[{name}] this site sends its prompt only under secure aggregation "
                    "(require_secure_aggregation: true in its site config); run with "
                    "federation.secure_aggregation=true."
                )
                log(WARNING, "[fedprompt] refused a plain train request: %s", reason)
                return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        return call_next(msg, ctxt)

    def train_with_fitres(message: Message, context: Context) -> Message:
        plain, keys, clipping_range, max_weight = _as_message_api(message)
        reply = call_next(plain, context)
        if reply.has_error():
            raise SiteRefusedRound(reply)
        return _as_fitres(reply, keys, clipping_range, max_weight)

    try:
        return secaggplus_mod(msg, ctxt, train_with_fitres)
    except SiteRefusedRound as refused:
        return Message(refused.reply.error, reply_to=msg)
