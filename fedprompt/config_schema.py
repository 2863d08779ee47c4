"""One validation pass over a composed run config, before any process starts.

Every key a run reads has a rule: its type and its allowed range or choices, depending on the
config groups chosen (``privacy.epsilon`` only under ``privacy=dpsgd``). Keys that must agree
(secure aggregation and the strategy, base-to-novel and central evaluation, ...) are checked
together. The first problem stops the run with one sentence naming the key, the value and what
is allowed; ``fedprompt simulate``, ``config``, ``table`` and ``study`` and the ServerApp call
``check_config`` before they start anything, so a bad value costs seconds, not a Flower start.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedprompt.config import ConfigError
from fedprompt.data.acquisition import ACQUISITIONS
from fedprompt.privacy.calibration import (
    check_budget_reachable,
    default_delta,
    planned_steps,
    sample_rate,
)

MIN_DP_RECORDS = 10
"""Fewest training records a DP-SGD site may hold: below this, noise drowns every step."""


@dataclass(frozen=True)
class Rule:
    """What one key may hold.

    Attributes:
        key: The dotted config key.
        kind: ``int``, ``float``, ``bool``, ``str`` or ``list`` (a list of names).
        low, high: Bounds of a number (None: unbounded), inclusive unless ``*_open``.
        choices: The strings a ``str`` key may take.
        nullable: Whether ``null`` is allowed (it means "the default" where a key says so).
        hint: What the range means, for the sentence.
    """

    key: str
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    nullable: bool = False
    hint: str = ""

    def allowed(self) -> str:
        """The allowed values in words: ``an integer >= 1``, ``one of sgd, adamw``."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        noun = {
            int: "an integer",
            float: "a finite number",
            bool: "true or false",
            list: "a list of distinct names",
        }.get(self.kind, "a string")
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        text = noun + (" " + " and ".join(bounds) if bounds else "")
        if self.nullable:
            text += ", or null"
        return text + (f" ({self.hint})" if self.hint else "")

    def allows(self, value: Any) -> bool:
        """Whether ``value`` meets the rule (``allowed()`` says the same in words)."""
        if value is None:
            return self.nullable
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is list:
            names = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            return names and len(set(value)) == len(value)
        if self.kind is str:
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _number(bound: float) -> str:
    """A bound as the user types it: ``2147483648``, not ``2.14748e+09``."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


COMMON: tuple[Rule, ...] = (
    Rule("seed", int),
    Rule("federation.mode", str, choices=("simulation", "deployment")),
    Rule("federation.num_sites", int, low=1),
    Rule("federation.rounds", int, low=1),
    Rule("federation.fraction_train", float, low=0, high=1, low_open=True),
    Rule("federation.fraction_evaluate", float, low=0, high=1, low_open=True),
    Rule("federation.min_sites", int, low=1),
    Rule("federation.connect_timeout", float, low=0, hint="seconds"),
    Rule("federation.round_timeout", float, low=0, low_open=True, hint="seconds"),
    Rule("federation.max_update_ratio", float, low=1),
    Rule("federation.client_cpus", float, low=0, low_open=True),
    Rule("federation.client_gpus", float, low=0),
    Rule("federation.ray_address", str, nullable=True),
    Rule("federation.sites", list, nullable=True),
    Rule("federation.secure_aggregation", bool),
    Rule("federation.secagg.num_shares", float, low=0, low_open=True),
    Rule("federation.secagg.reconstruction_threshold", float, low=0, low_open=True),
    Rule("federation.secagg.max_weight", float, low=0, low_open=True, nullable=True),
    Rule("federation.secagg.clipping_range", float, low=0, low_open=True),
    Rule("federation.secagg.quantization_range", int, low=2, high=2**31),
    Rule("train.shots", int, low=0, hint="images per class; 0 means every image"),
    Rule("train.local_epochs", int, low=1),
    Rule("train.batch_size", int, low=1),
    Rule("train.optimizer", str, choices=("sgd", "adamw")),
    Rule("train.lr", float, low=0, low_open=True),
    Rule("train.momentum", float, low=0, high=1, high_open=True),
    Rule("train.weight_decay", float, low=0),
    Rule("train.lr_schedule", str, choices=("constant", "cosine")),
    Rule("train.lr_step", str, choices=("epoch", "batch")),
    Rule("train.warmup_epochs", int, low=0, hint="epochs of the run, counted across rounds"),
    Rule("train.warmup_lr", float, low=0, low_open=True),
    Rule("recipe.name", str, choices=("federated", "paper")),
    Rule(
        "personalization.name",
        str,
        choices=("none", "local_only", "finetune", "promptfolio", "fedpgp", "fedotp"),
    ),
    Rule("evaluation.central", bool),
    Rule("evaluation.membership_inference", bool),
    Rule("evaluation.share_site_histograms", bool),
    Rule("features.views", int, low=1),
    Rule("features.batch_size", int, low=1),
    Rule("features.num_workers", int, low=0),
    Rule("features.memory_mb", float, low=0),
    Rule("features.patch_tokens_budget_mb", float, low=0),
    Rule("features.normalization", str, choices=("backbone", "imagenet")),
    Rule("evaluation.holdout_sites", int, low=0),
    Rule("evaluation.unseen_datasets", list),
    Rule("federation.site_datasets", list, nullable=True),
)

WHERE_PRESENT: tuple[Rule, ...] = (
    # Method settings (each method's yaml holds some of them).
    Rule("method.n_ctx", int, low=1),
    Rule("method.ctx_init", str),
    Rule("method.template", str),
    Rule("method.class_specific", bool),
    Rule("method.trim_padding", bool),
    Rule("method.text_dropout", bool),
    Rule("method.paired_cosine", bool),
    Rule("method.renormalize", bool),
    Rule("method.solver", str, choices=("sgd", "lbfgs")),
    Rule("method.use_descriptions", bool),
    Rule("method.descriptions", str, nullable=True),
    *(
        Rule(f"method.{name}", float, low=0)
        for name in (
            "sccm_weight",
            "kdsp_weight",
            "gad_weight",
            "lgd_weight",
            "kg_weight",
            "entropy_weight",
            "kd_weight",
            "view_kd_weight",
            "cosine_weight",
            "anchor_weight",
            "contrastive_weight",
            "sce_alpha",
            "sce_beta",
            "strength",
            "alpha",
        )
    ),
    *(
        Rule(f"method.{name}", float, low=0, low_open=True)
        for name in ("tau", "temperature", "tau_start", "tau_end")
    ),
    Rule("method.gamma", float, low=0, high=1),
    *(
        Rule(f"method.{name}", float, low=0, high=1, low_open=True)
        for name in ("top_k_ratio", "top_ratio", "ratio")
    ),
    *(
        Rule(f"method.{name}", int, low=1)
        for name in ("bank_size", "reduction", "anneal_steps", "images_per_pass")
    ),
    # Dataset settings (each dataset's yaml holds some of them).
    Rule("dataset.test_fraction", float, low=0, high=1, high_open=True),
    Rule("dataset.val_fraction", float, low=0, high=1, high_open=True),
    Rule("dataset.download", bool),
    Rule("dataset.synthetic_fallback", bool),
    Rule("dataset.classnames", list, nullable=True),
    Rule("dataset.manifest", str),
    Rule("partition.acquisition", str, choices=ACQUISITIONS),
)
"""Rules for keys only some group files have; a key that is absent is not checked."""

BY_GROUP: dict[tuple[str, str], tuple[Rule, ...]] = {
    ("partition", "dirichlet"): (
        Rule("partition.alpha", float, low=0, low_open=True, hint="smaller is more skewed"),
        Rule("partition.min_size", int, low=0),
    ),
    ("partition", "pathological"): (Rule("partition.classes_per_site", int, low=1),),
    ("privacy", "dpsgd"): (
        Rule("privacy.epsilon", float, low=0, low_open=True),
        Rule("privacy.delta", float, low=0, high=1, low_open=True, high_open=True, nullable=True),
        Rule("privacy.noise_multiplier", float, low=0, low_open=True, nullable=True),
        Rule("privacy.max_grad_norm", float, low=0, low_open=True),
        Rule("privacy.accountant", str, choices=("prv", "rdp")),
        Rule("privacy.clipping", str, choices=("auto", "text_features", "exact")),
        Rule("privacy.exact_chunk_size", int, low=1, nullable=True),
        Rule("privacy.deterministic", bool),
    ),
    ("privacy", "site_level"): (
        Rule("privacy.clipping_norm", float, low=0, low_open=True),
        Rule("privacy.noise_multiplier", float, low=0),
        Rule("privacy.delta", float, low=0, high=1, low_open=True, high_open=True),
        Rule("privacy.side", str, choices=("server", "client")),
    ),
    ("personalization", "finetune"): (Rule("personalization.local_epochs", int, low=1),),
    ("personalization", "promptfolio"): (Rule("personalization.mix", float, low=0, high=1),),
    ("personalization", "fedpgp"): (
        Rule("personalization.rank", int, low=1),
        Rule("personalization.weight", float, low=0),
        Rule("personalization.temperature", float, low=0, low_open=True),
    ),
    ("personalization", "fedotp"): (
        Rule("personalization.eps", float, low=0, low_open=True),
        Rule("personalization.mass", float, low=0, high=1, low_open=True),
        Rule("personalization.max_iter", int, low=1),
        Rule("personalization.thresh", float, low=0, low_open=True),
    ),
    ("strategy", "fedprox"): (Rule("strategy.proximal_mu", float, low=0),),
    ("strategy", "trimmed_mean"): (Rule("strategy.beta", float, low=0, high=0.5, high_open=True),),
    ("strategy", "fedadam"): (
        Rule("strategy.eta", float, low=0, low_open=True),
        Rule("strategy.eta_l", float, low=0, low_open=True),
        Rule("strategy.beta_1", float, low=0, high=1, high_open=True),
        Rule("strategy.beta_2", float, low=0, high=1, high_open=True),
        Rule("strategy.tau", float, low=0, low_open=True),
    ),
}

CONTEXT_METHODS = ("coop", "kgcoop", "prograd", "biomedcoop", "ogkd", "vmfcoop")
"""Methods with one learned CoOp context, into which a personalization splices a site's own."""
CONTEXT_SCHEMES = ("promptfolio", "fedpgp", "fedotp")
"""Personalizations that splice a site's own tensors into the method's context."""

SECURE_STRATEGIES = ("fedavg", "fedprox", "fedadam")
"""Strategies that need only the weighted mean of the updates, which SecAgg+ yields."""

RAY_ADDRESS = re.compile(r"[A-Za-z0-9.\-]+:\d{1,5}")
"""``federation.ray_address``: a head's host name or IPv4 address, and its port."""


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)  # None where the key is absent
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _group(cfg: DictConfig, group: str) -> str:
    return str(cfg[group].name)  # compose_config refuses a config without the group


def _cross_checks(cfg: DictConfig) -> str | None:
    """The first disagreement between keys, as a sentence, or None."""
    federation = cfg.federation
    simulated = federation.mode == "simulation"
    privacy, strategy = _group(cfg, "privacy"), _group(cfg, "strategy")
    if not simulated and federation.min_sites > federation.num_sites:
        return (
            f"federation.min_sites={federation.min_sites} is more than federation.num_sites="
            f"{federation.num_sites}; it must be at most the number of sites."
        )
    if privacy == "site_level" and float(federation.fraction_train) != 1.0:
        return (
            f"privacy=site_level accounts every site in every round, but federation."
            f"fraction_train={federation.fraction_train}; set federation.fraction_train=1.0."
        )
    if _group(cfg, "protocol") == "base_to_novel":
        if not simulated:
            return (
                "protocol=base_to_novel needs a central test split of every class; run it with "
                "federation.mode=simulation."
            )
        if not cfg.evaluation.central:
            return (
                "protocol=base_to_novel scores the novel classes centrally; set "
                "evaluation.central=true."
            )
    if privacy != "none" and _group(cfg, "method") == "zeroshot":
        return (
            f"method=zeroshot trains nothing, so privacy={privacy} has nothing to protect; use "
            "privacy=none."
        )
    address = _value(cfg, "federation.ray_address")
    if address is not None and not RAY_ADDRESS.fullmatch(str(address)):
        return (
            f"federation.ray_address={address} is not the host:port of a Ray cluster's head "
            "(ray start --head --port <port>); give it as host:port, or null."
        )
    holdout = int(_value(cfg, "evaluation.holdout_sites") or 0)
    if holdout and not simulated:
        return (
            f"evaluation.holdout_sites={holdout} holds out simulated sites; in deployment a "
            "hospital that only evaluates is not supported yet, so set it to 0."
        )
    if holdout and (federation.secure_aggregation or privacy == "site_level"):
        what = "SecAgg+" if federation.secure_aggregation else "privacy=site_level"
        return (
            f"evaluation.holdout_sites={holdout}: {what} needs every sampled site's update, "
            "and a held-out site sends none; set evaluation.holdout_sites=0."
        )
    if holdout >= int(federation.num_sites):
        return (
            f"evaluation.holdout_sites={holdout} would leave no site to train among "
            f"federation.num_sites={federation.num_sites}; hold out fewer sites."
        )
    problem = _tasks_problem(cfg)
    if problem is not None:
        return problem
    unseen = _value(cfg, "evaluation.unseen_datasets") or []
    if unseen and not simulated:
        return (
            "evaluation.unseen_datasets is scored by the server on images it holds; in "
            "deployment the centre holds none, so leave it empty."
        )
    problem = _personalization_problem(cfg)
    if problem is not None:
        return problem
    if _value(cfg, "method.solver") == "lbfgs":
        if not simulated:
            return (
                "method.solver=lbfgs fits the papers' centralized linear probe on one simulated "
                "site's images; run it with federation.mode=simulation or use method.solver=sgd."
            )
        if int(federation.num_sites) != 1:
            return (
                f"method.solver=lbfgs fits the papers' centralized linear probe on one site's "
                f"images, but federation.num_sites={federation.num_sites}; set "
                "federation.num_sites=1 (simulation) or use method.solver=sgd."
            )
        if privacy != "none":
            return (
                f"method.solver=lbfgs has no differentially private form; use privacy=none or "
                f"method.solver=sgd with privacy={privacy}."
            )
    if _group(cfg, "partition") == "natural" and _value(cfg, "dataset.format") != "manifest":
        return (
            f"partition=natural takes each image's site from a manifest, but dataset="
            f"{_group(cfg, 'dataset')} has no site column; use dataset=manifest (a CSV "
            "path,label,site) or another partition."
        )
    if _value(cfg, "partition.acquisition") not in (None, "none") and not simulated:
        return (
            f"partition.acquisition={cfg.partition.acquisition} simulates sites that differ in "
            "acquisition, but in deployment each hospital's images come from its own scanner; "
            "set partition.acquisition=none."
        )
    if _group(cfg, "partition") == "pathological":
        classes = _value(cfg, "dataset.classnames")
        per_site = int(cfg.partition.classes_per_site)
        if isinstance(classes, list) and per_site > len(classes):
            return (
                f"partition.classes_per_site={per_site} is more than the dataset's "
                f"{len(classes)} classes; it must be between 1 and {len(classes)}."
            )
    if federation.secure_aggregation:
        if strategy not in SECURE_STRATEGIES:
            return (
                f"strategy={strategy} needs each site's update, which SecAgg+ hides from the "
                f"server; use one of {', '.join(SECURE_STRATEGIES)} with "
                "federation.secure_aggregation=true."
            )
        if privacy == "site_level":
            return (
                "privacy=site_level clips each site's update at the server, which SecAgg+ hides; "
                "use privacy=dpsgd (each site's noise stays in the sum) with secure aggregation."
            )
        key = "num_sites" if simulated else "min_sites"
        if int(federation[key]) < 2:
            return (
                f"federation.{key}={federation[key]}: SecAgg+ sums at least two sites' prompts; "
                "raise it to 2 or more, or set federation.secure_aggregation=false."
            )
    return None


def _tasks_problem(cfg: DictConfig) -> str | None:
    """Why sites with different tasks (``federation.site_datasets``) cannot run so, or None."""
    tasks = _value(cfg, "federation.site_datasets") or []
    if not tasks:
        return None
    federation = cfg.federation
    if federation.mode != "simulation":
        return (
            "federation.site_datasets simulates sites with different tasks; a deployed "
            "federation shares one class list, so leave it null."
        )
    if int(federation.num_sites) != len(tasks):
        return (
            f"federation.site_datasets names {len(tasks)} datasets, one per site, but "
            f"federation.num_sites={federation.num_sites}; set federation.num_sites={len(tasks)}."
        )
    if cfg.evaluation.central:
        return (
            "federation.site_datasets gives each site its own task, so there is no one central "
            "test split; set evaluation.central=false (each site scores its own)."
        )
    # protocol=base_to_novel never gets here: it needs evaluation.central, refused above.
    split = None
    if _group(cfg, "partition") != "iid":
        split = f"partition={_group(cfg, 'partition')}"
    elif _value(cfg, "partition.acquisition") not in (None, "none"):
        split = f"partition.acquisition={_value(cfg, 'partition.acquisition')}"
    if split is not None:
        return (
            f"federation.site_datasets gives each site a whole dataset, which {split} would "
            "not change; use it with partition=iid and no acquisition."
        )
    method = _group(cfg, "method")
    if method in ("linear_probe", "zeroshot") or _value(cfg, "method.class_specific"):
        what = f"method={method}"
        if _value(cfg, "method.class_specific"):
            what += " with method.class_specific=true"
        return (
            f"federation.site_datasets shares one prompt between sites with different class "
            f"lists, and {what} learns nothing shared across class lists; use a shared-context "
            "method such as coop."
        )
    return None


def _personalization_problem(cfg: DictConfig) -> str | None:
    """Why the chosen personalization cannot run with the method or privacy, or None."""
    scheme, method = _group(cfg, "personalization"), _group(cfg, "method")
    if scheme == "none":
        return None
    if method == "zeroshot" or _value(cfg, "method.solver") == "lbfgs":
        what = "method=zeroshot" if method == "zeroshot" else "method.solver=lbfgs"
        return (
            f"personalization={scheme} needs a prompt each site trains round by round, which "
            f"{what} does not have; use personalization=none."
        )
    if scheme in CONTEXT_SCHEMES and method not in CONTEXT_METHODS:
        return (
            f"personalization={scheme} splices each site's own tensors into a CoOp-style "
            f"context, which method={method} does not have; use one of "
            f"{', '.join(CONTEXT_METHODS)}, or personalization=local_only or finetune."
        )
    if scheme == "fedotp" and method != "coop":
        return (
            f"personalization=fedotp scores classes by transport over patch tokens in place of "
            f"CoOp's cross-entropy, so it runs with method=coop, not method={method}."
        )
    if _group(cfg, "privacy") == "dpsgd" and scheme != "finetune":
        return (
            f"privacy=dpsgd protects the global prompt only, and personalization={scheme} "
            "trains a site's own tensors with it; use personalization=finetune or none with "
            "privacy=dpsgd."
        )
    return None


def rules_for(cfg: DictConfig) -> tuple[Rule, ...]:
    """The rules that apply: the common ones, its groups' own, and those of keys it holds."""
    chosen = [
        BY_GROUP.get((group, _group(cfg, group)), ())
        for group in ("partition", "privacy", "strategy", "personalization")
    ]
    present = tuple(
        rule
        for rule in WHERE_PRESENT
        if OmegaConf.select(cfg, rule.key, default=KeyError) is not KeyError
    )
    return COMMON + tuple(rule for rules in chosen for rule in rules) + present


def check_config(cfg: DictConfig) -> None:
    """Check every key's type and range, then the keys that must agree.

    Raises:
        ConfigError: The first problem, in one sentence naming the key, the value and what is
            allowed.
    """
    for rule in rules_for(cfg):
        value = _value(cfg, rule.key)
        if not rule.allows(value):
            shown = "null" if value is None else value
            raise ConfigError(f"{rule.key}={shown} is not allowed: use {rule.allowed()}.")
    problem = _cross_checks(cfg)
    if problem:
        raise ConfigError(problem)


def check_site_sizes(cfg: DictConfig, train_sizes: Mapping[str, int]) -> None:
    """Refuse a run whose sites' training sets cannot carry its privacy settings.

    Under ``privacy=dpsgd`` a site needs at least ``MIN_DP_RECORDS`` records, an explicit
    ``privacy.delta`` must stay below 1/n (at 1/n releasing one whole record is allowed), and
    the budget must be one the noise calibration can meet for the site's planned steps.

    Raises:
        ConfigError: The first site that cannot, with its size and the way out.
    """
    empty = sorted(name for name, n in train_sizes.items() if n < 1)
    if empty:
        raise ConfigError(
            f"Site {empty[0]} gets no training images (train.shots={cfg.train.shots}, "
            f"partition={_group(cfg, 'partition')}, {len(train_sizes)} sites); use fewer sites, "
            "another partition or more shots."
        )
    if _group(cfg, "privacy") != "dpsgd":
        return
    delta = cfg.privacy.get("delta")
    budget_checked: set[int] = set()
    for name, n in sorted(train_sizes.items(), key=lambda item: item[1]):
        if n < MIN_DP_RECORDS:
            raise ConfigError(
                f"Site {name} holds {n} training images, fewer than the {MIN_DP_RECORDS} "
                "DP-SGD needs for noise that does not drown every step; use fewer sites, more "
                "train.shots, or privacy=none."
            )
        if delta is not None and float(delta) >= 1.0 / n:
            raise ConfigError(
                f"privacy.delta={delta} is not below 1/n = {1.0 / n:.3g} for site {name} "
                f"({n} training images): such a delta allows releasing a whole record; set it "
                "below 1/n or to null (1/(10 n))."
            )
        if cfg.privacy.get("noise_multiplier") is None and n not in budget_checked:
            budget_checked.add(n)
            rate = sample_rate(int(cfg.train.batch_size), n)
            steps = planned_steps(int(cfg.federation.rounds), int(cfg.train.local_epochs), rate)
            site_delta = float(delta) if delta is not None else default_delta(n)
            try:
                check_budget_reachable(
                    float(cfg.privacy.epsilon), site_delta, rate, steps, str(cfg.privacy.accountant)
                )
            except ValueError as err:
                raise ConfigError(f"Site {name} ({n} training images): {err}") from None
