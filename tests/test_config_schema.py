"""The one validation pass: every bad value is one sentence naming the key, the value and the
allowed range, before anything starts; keys that must agree are checked together."""

import copy
import importlib
import math
import re

import pytest
from omegaconf import OmegaConf

from fedprompt.backbones.preprocessing import NORMALIZATIONS
from fedprompt.cli import main
from fedprompt.config import ConfigError, compose_config
from fedprompt.config_schema import COMMON, check_config, check_site_sizes


@pytest.mark.parametrize("experiment", ["quickstart", "btmri_5sites"])
def test_the_shipped_experiments_pass(experiment):
    check_config(compose_config(experiment, []))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.num_sites=0"], r"federation.num_sites=0 is not allowed: use an integer >= 1"),
        (["federation.rounds=0"], r"federation.rounds=0 .* integer >= 1"),
        (["train.shots=-1"], r"train.shots=-1 .* integer >= 0"),
        (["train.lr=0"], r"train.lr=0 .* > 0"),
        (["train.lr=nan"], r"train.lr=nan .* finite number > 0"),
        (["train.batch_size=0"], r"train.batch_size=0 .* >= 1"),
        (["train.local_epochs=1.5"], r"train.local_epochs=1.5 .* an integer"),
        (["train.optimizer=adam"], r"train.optimizer=adam .* one of sgd, adamw"),
        (["train.momentum=1"], r"train.momentum=1 .* < 1"),
        (["federation.fraction_train=0"], r"federation.fraction_train=0 .* > 0 and <= 1"),
        (["federation.mode=cloud"], r"federation.mode=cloud .* one of simulation, deployment"),
        (["federation.secure_aggregation=maybe"], r"secure_aggregation=maybe .* true or false"),
        (["federation.sites=[a,a]"], r"federation.sites=\['a', 'a'\]"),
        (["partition=dirichlet", "partition.alpha=0"], r"partition.alpha=0 .* > 0"),
        (["partition=dirichlet", "partition.alpha=-1"], r"partition.alpha=-1"),
        (["partition=pathological", "partition.classes_per_site=0"], r"classes_per_site=0"),
        (["privacy=dpsgd", "privacy.epsilon=0"], r"privacy.epsilon=0 .* finite number > 0"),
        (["privacy=dpsgd", "privacy.epsilon=-1"], r"privacy.epsilon=-1"),
        (["privacy=dpsgd", "privacy.epsilon=inf"], r"privacy.epsilon=inf .* finite"),
        (["privacy=dpsgd", "privacy.delta=1"], r"privacy.delta=1 .* > 0 and < 1, or null"),
        (["privacy=dpsgd", "privacy.delta=0"], r"privacy.delta=0 "),
        (["privacy=dpsgd", "privacy.accountant=gdp"], r"privacy.accountant=gdp .* prv, rdp"),
        (["privacy=dpsgd", "privacy.clipping=some"], r"privacy.clipping=some"),
        (["privacy=site_level", "privacy.side=middle"], r"privacy.side=middle"),
        (["strategy=trimmed_mean", "strategy.beta=0.5"], r"strategy.beta=0.5 .* < 0.5"),
        (["strategy=fedprox", "strategy.proximal_mu=-0.1"], r"strategy.proximal_mu=-0.1"),
        (["method.n_ctx=0"], r"method.n_ctx=0 .* integer >= 1"),
        (["method=biomedcoop", "method.tau=0"], r"method.tau=0 .* > 0"),
        (["method=ogkd", "method.gamma=1.5"], r"method.gamma=1.5 .* <= 1"),
        (["method=kgcoop", "method.kg_weight=-1"], r"method.kg_weight=-1 .* >= 0"),
        (["dataset=image_folder", "dataset.test_fraction=1"], r"dataset.test_fraction=1 .* < 1"),
        (["features.normalization=clip"], r"features.normalization=clip .* backbone, imagenet"),
        (["train.lr_step=round"], r"train.lr_step=round .* one of epoch, batch"),
        (["evaluation.holdout_sites=-1"], r"evaluation.holdout_sites=-1 .* >= 0"),
        (["partition.acquisition=mri"], r"partition.acquisition=mri .* one of none, scanner"),
        (["dataset=manifest", "dataset.manifest=null"], r"dataset.manifest=null .* a string"),
    ],
)
def test_an_out_of_range_value_is_one_sentence_naming_key_value_and_range(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_config(compose_config("quickstart", overrides))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["federation.mode=deployment", "federation.num_sites=2", "federation.min_sites=3"],
            "federation.min_sites=3 is more than federation.num_sites=2",
        ),
        (
            ["privacy=site_level", "federation.fraction_train=0.5"],
            "privacy=site_level accounts every site in every round",
        ),
        (["protocol=base_to_novel", "evaluation.central=false"], "evaluation.central=true"),
        (
            ["protocol=base_to_novel", "federation.mode=deployment"],
            "needs a central test split",
        ),
        (["method=zeroshot", "privacy=dpsgd"], "method=zeroshot trains nothing"),
        (
            ["partition=pathological", "partition.classes_per_site=5"],
            "classes_per_site=5 is more than the dataset's 4 classes",
        ),
        (["partition=natural"], "partition=natural takes each image's site from a manifest"),
        (
            ["partition.acquisition=scanner", "federation.mode=deployment"],
            "partition.acquisition=scanner simulates sites that differ in acquisition",
        ),
        (["evaluation.holdout_sites=3"], "would leave no site to train among"),
        (["federation.ray_address='http://head'"], "is not the host:port of a Ray cluster"),
        (
            ["evaluation.holdout_sites=1", "federation.mode=deployment"],
            "holds out simulated sites",
        ),
        (
            ["evaluation.holdout_sites=1", "federation.secure_aggregation=true"],
            "SecAgg\\+ needs every sampled site's update",
        ),
    ],
)
def test_keys_that_must_agree_are_checked_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config("quickstart", overrides))


def test_natural_sites_and_scanners_pass_where_they_apply():
    check_config(compose_config("quickstart", ["dataset=manifest", "partition=natural"]))
    check_config(
        compose_config("quickstart", ["partition=dirichlet", "partition.acquisition=scanner"])
    )


def test_a_wrong_group_choice_lists_the_valid_ones():
    expected = r"method=copo is not one of fedprompt's method configs; choose one of .*coop"
    with pytest.raises(ConfigError, match=expected):
        compose_config("quickstart", ["method=copo"])
    with pytest.raises(ConfigError, match=r"choose one of .*dirichlet, iid, natural, pathological"):
        compose_config("quickstart", ["partition=dirichet"])


def test_every_common_rule_names_a_key_the_root_config_has():
    cfg = compose_config(None, [])
    for rule in COMMON:
        node, _, leaf = rule.key.rpartition(".")
        assert leaf in _section(cfg, node), rule.key


def _section(cfg, dotted):
    for part in filter(None, dotted.split(".")):
        cfg = cfg[part]
    return cfg


def test_sites_too_small_for_dp_or_a_delta_at_one_over_n_are_refused():
    dp = compose_config("quickstart", ["privacy=dpsgd"])
    check_site_sizes(dp, {"site-0": 40, "site-1": 40})
    with pytest.raises(
        ConfigError, match="site-1 holds 6 training images, fewer than the 10 DP-SGD needs"
    ):
        check_site_sizes(dp, {"site-0": 40, "site-1": 6})
    with pytest.raises(
        ConfigError, match=r"privacy.delta=0.05 is not below 1/n = 0.05 for site site-0"
    ):
        check_site_sizes(
            compose_config("quickstart", ["privacy=dpsgd", "privacy.delta=0.05"]), {"site-0": 20}
        )
    with pytest.raises(ConfigError, match="Site site-2 gets no training images"):
        check_site_sizes(compose_config("quickstart", []), {"site-1": 3, "site-2": 0})
    # Without DP, a small site is fine.
    check_site_sizes(compose_config("quickstart", []), {"site-0": 2})


def test_a_budget_the_calibration_cannot_meet_is_refused_before_the_run():
    cfg = compose_config("quickstart", ["privacy=dpsgd", "privacy.epsilon=1e9"])
    with pytest.raises(
        ConfigError, match=r"Site site-0 \(40 training images\): privacy.epsilon=1e\+09 is more"
    ):
        check_site_sizes(cfg, {"site-0": 40})


@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.num_sites=0"],
        ["partition=dirichlet", "partition.alpha=0"],
        ["privacy=dpsgd", "privacy.epsilon=1e9"],
        ["method=copo"],
    ],
)
def test_the_cli_refuses_with_status_2_and_writes_no_results_folder(tmp_path, capsys, overrides):
    out = tmp_path / "run"
    assert main(["simulate", "quickstart", *overrides, f"output_dir={out}"]) == 2
    assert not out.exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("fedprompt: ") and "\n" not in error
    if "privacy.epsilon=1e9" not in overrides:  # the budget needs the sites' sizes: simulate's
        assert main(["config", "quickstart", *overrides]) == 2


def test_the_normalization_choices_are_the_feature_pipelines():
    rule = next(rule for rule in COMMON if rule.key == "features.normalization")
    assert rule.choices == tuple(NORMALIZATIONS)


# Every checked key and what it may hold, as the refusal words it: the specification the schema's
# rule tables must meet, written here apart from those tables so that a changed bound, choice or
# kind shows. A key that only some group files hold names the group that brings its rule.
ALLOWED = {
    "seed": "an integer",
    "federation.mode": "one of simulation, deployment",
    "federation.num_sites": "an integer >= 1",
    "federation.rounds": "an integer >= 1",
    "federation.fraction_train": "a finite number > 0 and <= 1",
    "federation.fraction_evaluate": "a finite number > 0 and <= 1",
    "federation.min_sites": "an integer >= 1",
    "federation.connect_timeout": "a finite number >= 0 (seconds)",
    "federation.round_timeout": "a finite number > 0 (seconds)",
    "federation.max_update_ratio": "a finite number >= 1",
    "federation.client_cpus": "a finite number > 0",
    "federation.client_gpus": "a finite number >= 0",
    "federation.ray_address": "a string, or null",
    "federation.sites": "a list of distinct names, or null",
    "federation.secure_aggregation": "true or false",
    "federation.secagg.num_shares": "a finite number > 0",
    "federation.secagg.reconstruction_threshold": "a finite number > 0",
    "federation.secagg.max_weight": "a finite number > 0, or null",
    "federation.secagg.clipping_range": "a finite number > 0",
    "federation.secagg.quantization_range": "an integer >= 2 and <= 2147483648",
    "train.shots": "an integer >= 0 (images per class; 0 means every image)",
    "train.local_epochs": "an integer >= 1",
    "train.batch_size": "an integer >= 1",
    "train.optimizer": "one of sgd, adamw",
    "train.lr": "a finite number > 0",
    "train.momentum": "a finite number >= 0 and < 1",
    "train.weight_decay": "a finite number >= 0",
    "train.lr_schedule": "one of constant, cosine",
    "train.lr_step": "one of epoch, batch",
    "train.warmup_epochs": "an integer >= 0 (epochs of the run, counted across rounds)",
    "train.warmup_lr": "a finite number > 0",
    "recipe.name": "one of federated, paper",
    "personalization.name": "one of none, local_only, finetune, promptfolio, fedpgp, fedotp",
    "evaluation.central": "true or false",
    "evaluation.membership_inference": "true or false",
    "evaluation.share_site_histograms": "true or false",
    "features.views": "an integer >= 1",
    "features.batch_size": "an integer >= 1",
    "features.num_workers": "an integer >= 0",
    "features.memory_mb": "a finite number >= 0",
    "features.patch_tokens_budget_mb": "a finite number >= 0",
    "features.normalization": "one of backbone, imagenet",
    "evaluation.holdout_sites": "an integer >= 0",
    "evaluation.unseen_datasets": "a list of distinct names",
    "federation.site_datasets": "a list of distinct names, or null",
    "method.n_ctx": "an integer >= 1",
    "method.ctx_init": "a string",
    "method.template": "a string",
    "method.class_specific": "true or false",
    "method.trim_padding": "true or false",
    "method.text_dropout": "true or false",
    "method.paired_cosine": "true or false",
    "method.renormalize": "true or false",
    "method.solver": "one of sgd, lbfgs",
    "method.use_descriptions": "true or false",
    "method.descriptions": "a string, or null",
    **{
        f"method.{name}": "a finite number >= 0"
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
    },
    **{
        f"method.{n}": "a finite number > 0" for n in ("tau", "temperature", "tau_start", "tau_end")
    },
    "method.gamma": "a finite number >= 0 and <= 1",
    **{
        f"method.{n}": "a finite number > 0 and <= 1" for n in ("top_k_ratio", "top_ratio", "ratio")
    },
    **{
        f"method.{n}": "an integer >= 1"
        for n in ("bank_size", "reduction", "anneal_steps", "images_per_pass")
    },
    "dataset.test_fraction": "a finite number >= 0 and < 1",
    "dataset.val_fraction": "a finite number >= 0 and < 1",
    "dataset.download": "true or false",
    "dataset.synthetic_fallback": "true or false",
    "dataset.classnames": "a list of distinct names, or null",
    "dataset.manifest": "a string",
    "partition.acquisition": "one of none, scanner",
    "partition=dirichlet partition.alpha": "a finite number > 0 (smaller is more skewed)",
    "partition=dirichlet partition.min_size": "an integer >= 0",
    "partition=pathological partition.classes_per_site": "an integer >= 1",
    "privacy=dpsgd privacy.epsilon": "a finite number > 0",
    "privacy=dpsgd privacy.delta": "a finite number > 0 and < 1, or null",
    "privacy=dpsgd privacy.noise_multiplier": "a finite number > 0, or null",
    "privacy=dpsgd privacy.max_grad_norm": "a finite number > 0",
    "privacy=dpsgd privacy.accountant": "one of prv, rdp",
    "privacy=dpsgd privacy.clipping": "one of auto, text_features, exact",
    "privacy=dpsgd privacy.exact_chunk_size": "an integer >= 1, or null",
    "privacy=dpsgd privacy.deterministic": "true or false",
    "privacy=site_level privacy.clipping_norm": "a finite number > 0",
    "privacy=site_level privacy.noise_multiplier": "a finite number >= 0",
    "privacy=site_level privacy.delta": "a finite number > 0 and < 1",
    "privacy=site_level privacy.side": "one of server, client",
    "personalization=finetune personalization.local_epochs": "an integer >= 1",
    "personalization=promptfolio personalization.mix": "a finite number >= 0 and <= 1",
    "personalization=fedpgp personalization.rank": "an integer >= 1",
    "personalization=fedpgp personalization.weight": "a finite number >= 0",
    "personalization=fedpgp personalization.temperature": "a finite number > 0",
    "personalization=fedotp personalization.eps": "a finite number > 0",
    "personalization=fedotp personalization.mass": "a finite number > 0 and <= 1",
    "personalization=fedotp personalization.max_iter": "an integer >= 1",
    "personalization=fedotp personalization.thresh": "a finite number > 0",
    "strategy=fedprox strategy.proximal_mu": "a finite number >= 0",
    "strategy=trimmed_mean strategy.beta": "a finite number >= 0 and < 0.5",
    "strategy=fedadam strategy.eta": "a finite number > 0",
    "strategy=fedadam strategy.eta_l": "a finite number > 0",
    "strategy=fedadam strategy.beta_1": "a finite number >= 0 and < 1",
    "strategy=fedadam strategy.beta_2": "a finite number >= 0 and < 1",
    "strategy=fedadam strategy.tau": "a finite number > 0",
}
BOUND = re.compile(r"(>=|>|<=|<) (-?[\d.]+)")


def _probes(allowed: str) -> list[tuple[object, bool]]:
    """Values on each side of every edge that ``allowed`` states, with whether it admits them."""
    nullable = allowed.endswith(", or null")
    probes: list[tuple[object, bool]] = [(None, nullable)]
    if allowed.startswith("one of "):
        choices = allowed.removeprefix("one of ").split(", ")
        return [*probes, *((c, True) for c in choices), ("bogus", False), (1, False)]
    if allowed == "true or false":
        return [*probes, (True, True), (False, True), ("true", False), (1, False)]
    if allowed.startswith("a list of distinct names"):
        return [*probes, (["a", "b"], True), (["a", "a"], False), ([""], False), ("a", False)]
    if allowed.startswith("a string"):
        return [*probes, ("text", True), (3, False), (True, False)]
    integer = allowed.startswith("an integer")
    probes += [("3", False), (True, False), (math.inf, False), (math.nan, False)]
    if integer:
        probes.append((2.5, False))
    bounds = BOUND.findall(allowed)
    if not bounds:
        return [*probes, (7, True), (-7, True)]
    for sign, text in bounds:
        edge = float(text)
        outward = -math.inf if sign.startswith(">") else math.inf
        beyond = edge + math.copysign(1, outward) if integer else math.nextafter(edge, outward)
        inward = -outward
        within = edge - math.copysign(1, outward) if integer else math.nextafter(edge, inward)
        at = int(edge) if integer else edge
        probes += [(at, sign.endswith("=")), (beyond, False), (within, True)]
    return probes


@pytest.fixture(scope="module")
def base_configs():
    """The quickstart config under each group that brings rules of its own, composed once."""
    groups = {spec.split(" ")[0] for spec in ALLOWED if " " in spec}
    return {
        group: compose_config("quickstart", [group] if group else []) for group in (*groups, "")
    }


@pytest.mark.parametrize("spec", sorted(ALLOWED))
def test_every_key_admits_exactly_its_stated_range(spec, base_configs):
    group, _, key = spec.rpartition(" ")
    allowed = ALLOWED[spec]
    for value, admitted in _probes(allowed):
        cfg = copy.deepcopy(base_configs[group])
        OmegaConf.set_readonly(cfg, False)
        OmegaConf.set_struct(cfg, False)
        OmegaConf.update(cfg, key, value, force_add=True)
        try:
            check_config(cfg)
            refusal = None
        except ConfigError as err:
            refusal = str(err)
        shown = "null" if value is None else value
        expected = f"{key}={shown} is not allowed: use {allowed}."
        if admitted:  # another check may still refuse the value, in a sentence of its own
            assert refusal is None or not refusal.startswith(expected[:-1]), (value, refusal)
        else:
            assert refusal == expected, (value, refusal)


def test_the_specification_covers_every_rule():
    from fedprompt.config_schema import BY_GROUP, WHERE_PRESENT

    stated = {spec.rpartition(" ")[2] for spec in ALLOWED}
    keys = {r.key for r in (*COMMON, *WHERE_PRESENT, *(r for g in BY_GROUP.values() for r in g))}
    assert keys == stated


# Each check of keys that must agree: the whole sentence it refuses with, and the nearest
# setting it lets pass.
CROSS_CHECK_REFUSALS = [
    (
        ["federation.site_datasets=[btmri_mini,synthetic,busi]", "federation.mode=deployment"],
        "federation.site_datasets simulates sites with different tasks; a deployed federation "
        "shares one class list, so leave it null.",
    ),
    (
        ["federation.mode=deployment", "federation.num_sites=2", "federation.min_sites=3"],
        (
            "federation.min_sites=3 is more than federation.num_sites=2; it must be at most the "
            "number of sites."
        ),
    ),
    (
        ["privacy=site_level", "federation.fraction_train=0.5"],
        (
            "privacy=site_level accounts every site in every round, but "
            "federation.fraction_train=0.5; set federation.fraction_train=1.0."
        ),
    ),
    (
        ["protocol=base_to_novel", "federation.mode=deployment"],
        (
            "protocol=base_to_novel needs a central test split of every class; run it with "
            "federation.mode=simulation."
        ),
    ),
    (
        ["protocol=base_to_novel", "evaluation.central=false"],
        "protocol=base_to_novel scores the novel classes centrally; set evaluation.central=true.",
    ),
    (
        ["method=zeroshot", "privacy=dpsgd"],
        (
            "method=zeroshot trains nothing, so privacy=dpsgd has nothing to protect; use "
            "privacy=none."
        ),
    ),
    (
        ["federation.ray_address='head:123456'"],
        (
            "federation.ray_address=head:123456 is not the host:port of a Ray cluster's head (ray"
            " start --head --port <port>); give it as host:port, or null."
        ),
    ),
    (
        ["evaluation.holdout_sites=1", "federation.mode=deployment"],
        (
            "evaluation.holdout_sites=1 holds out simulated sites; in deployment a hospital that "
            "only evaluates is not supported yet, so set it to 0."
        ),
    ),
    (
        ["evaluation.holdout_sites=1", "federation.secure_aggregation=true"],
        (
            "evaluation.holdout_sites=1: SecAgg+ needs every sampled site's update, and a "
            "held-out site sends none; set evaluation.holdout_sites=0."
        ),
    ),
    (
        ["evaluation.holdout_sites=1", "privacy=site_level"],
        (
            "evaluation.holdout_sites=1: privacy=site_level needs every sampled site's update, "
            "and a held-out site sends none; set evaluation.holdout_sites=0."
        ),
    ),
    (
        ["evaluation.holdout_sites=3"],
        (
            "evaluation.holdout_sites=3 would leave no site to train among "
            "federation.num_sites=3; hold out fewer sites."
        ),
    ),
    (
        ["federation.site_datasets=[btmri_mini,synthetic]"],
        (
            "federation.site_datasets names 2 datasets, one per site, but federation.num_sites=3;"
            " set federation.num_sites=2."
        ),
    ),
    (
        ["federation.site_datasets=[btmri_mini,synthetic,busi]"],
        (
            "federation.site_datasets gives each site its own task, so there is no one central "
            "test split; set evaluation.central=false (each site scores its own)."
        ),
    ),
    (
        [
            "federation.site_datasets=[btmri_mini,synthetic,busi]",
            "evaluation.central=false",
            "partition=dirichlet",
        ],
        (
            "federation.site_datasets gives each site a whole dataset, which partition=dirichlet "
            "would not change; use it with partition=iid and no acquisition."
        ),
    ),
    (
        [
            "federation.site_datasets=[btmri_mini,synthetic,busi]",
            "evaluation.central=false",
            "partition.acquisition=scanner",
        ],
        (
            "federation.site_datasets gives each site a whole dataset, which "
            "partition.acquisition=scanner would not change; use it with partition=iid and no "
            "acquisition."
        ),
    ),
    (
        [
            "federation.site_datasets=[btmri_mini,synthetic,busi]",
            "evaluation.central=false",
            "method=linear_probe",
        ],
        (
            "federation.site_datasets shares one prompt between sites with different class lists,"
            " and method=linear_probe learns nothing shared across class lists; use a "
            "shared-context method such as coop."
        ),
    ),
    (
        [
            "federation.site_datasets=[btmri_mini,synthetic,busi]",
            "evaluation.central=false",
            "method.class_specific=true",
        ],
        (
            "federation.site_datasets shares one prompt between sites with different class lists,"
            " and method=coop with method.class_specific=true learns nothing shared across class "
            "lists; use a shared-context method such as coop."
        ),
    ),
    (
        [
            "federation.site_datasets=[btmri_mini,synthetic,busi]",
            "evaluation.central=false",
            "method=zeroshot",
        ],
        (
            "federation.site_datasets shares one prompt between sites with different class lists,"
            " and method=zeroshot learns nothing shared across class lists; use a "
            "shared-context method such as coop."
        ),
    ),
    (
        ["evaluation.unseen_datasets=[busi]", "federation.mode=deployment"],
        (
            "evaluation.unseen_datasets is scored by the server on images it holds; in deployment"
            " the centre holds none, so leave it empty."
        ),
    ),
    (
        ["method=zeroshot", "personalization=finetune"],
        (
            "personalization=finetune needs a prompt each site trains round by round, which "
            "method=zeroshot does not have; use personalization=none."
        ),
    ),
    (
        [
            "method=linear_probe",
            "method.solver=lbfgs",
            "personalization=finetune",
            "federation.num_sites=1",
        ],
        (
            "personalization=finetune needs a prompt each site trains round by round, which "
            "method.solver=lbfgs does not have; use personalization=none."
        ),
    ),
    (
        ["method=kgcoop", "personalization=fedotp"],
        (
            "personalization=fedotp scores classes by transport over patch tokens in place of "
            "CoOp's cross-entropy, so it runs with method=coop, not method=kgcoop."
        ),
    ),
    (
        ["method=linear_probe", "personalization=promptfolio"],
        (
            "personalization=promptfolio splices each site's own tensors into a CoOp-style "
            "context, which method=linear_probe does not have; use one of coop, kgcoop, prograd, "
            "biomedcoop, ogkd, vmfcoop, or personalization=local_only or finetune."
        ),
    ),
    (
        ["privacy=dpsgd", "personalization=promptfolio"],
        (
            "privacy=dpsgd protects the global prompt only, and personalization=promptfolio "
            "trains a site's own tensors with it; use personalization=finetune or none with "
            "privacy=dpsgd."
        ),
    ),
    (
        ["method=linear_probe", "method.solver=lbfgs"],
        (
            "method.solver=lbfgs fits the papers' centralized linear probe on one site's images, "
            "but federation.num_sites=3; set federation.num_sites=1 (simulation) or use "
            "method.solver=sgd."
        ),
    ),
    (
        [
            "method=linear_probe",
            "method.solver=lbfgs",
            "federation.num_sites=1",
            "federation.mode=deployment",
        ],
        (
            "method.solver=lbfgs fits the papers' centralized linear probe on one simulated "
            "site's images; run it with federation.mode=simulation or use method.solver=sgd."
        ),
    ),
    (
        ["method=linear_probe", "method.solver=lbfgs", "federation.num_sites=1", "privacy=dpsgd"],
        (
            "method.solver=lbfgs has no differentially private form; use privacy=none or "
            "method.solver=sgd with privacy=dpsgd."
        ),
    ),
    (
        ["partition=natural"],
        (
            "partition=natural takes each image's site from a manifest, but dataset=btmri_mini "
            "has no site column; use dataset=manifest (a CSV path,label,site) or another "
            "partition."
        ),
    ),
    (
        ["partition.acquisition=scanner", "federation.mode=deployment"],
        (
            "partition.acquisition=scanner simulates sites that differ in acquisition, but in "
            "deployment each hospital's images come from its own scanner; set "
            "partition.acquisition=none."
        ),
    ),
    (
        ["partition=pathological", "partition.classes_per_site=5"],
        (
            "partition.classes_per_site=5 is more than the dataset's 4 classes; it must be "
            "between 1 and 4."
        ),
    ),
    (
        ["federation.secure_aggregation=true", "strategy=trimmed_mean"],
        (
            "strategy=trimmed_mean needs each site's update, which SecAgg+ hides from the server;"
            " use one of fedavg, fedprox, fedadam with federation.secure_aggregation=true."
        ),
    ),
    (
        ["federation.secure_aggregation=true", "privacy=site_level"],
        (
            "privacy=site_level clips each site's update at the server, which SecAgg+ hides; use "
            "privacy=dpsgd (each site's noise stays in the sum) with secure aggregation."
        ),
    ),
    (
        ["federation.secure_aggregation=true", "federation.num_sites=1"],
        (
            "federation.num_sites=1: SecAgg+ sums at least two sites' prompts; raise it to 2 or "
            "more, or set federation.secure_aggregation=false."
        ),
    ),
    (
        [
            "federation.secure_aggregation=true",
            "federation.mode=deployment",
            "federation.min_sites=1",
        ],
        (
            "federation.min_sites=1: SecAgg+ sums at least two sites' prompts; raise it to 2 or "
            "more, or set federation.secure_aggregation=false."
        ),
    ),
]
CROSS_CHECK_EDGES_THAT_PASS = [
    ["personalization=fedotp"],
    ["method=kgcoop", "personalization=promptfolio"],
    ["method=kgcoop", "personalization=finetune"],
    ["federation.mode=deployment", "federation.num_sites=2", "federation.min_sites=2"],
    ["privacy=site_level", "federation.fraction_train=1.0"],
    ["protocol=base_to_novel", "evaluation.central=true"],
    ["method=zeroshot", "privacy=none"],
    ["federation.ray_address='head:6379'"],
    ["evaluation.holdout_sites=2"],
    ["federation.site_datasets=[btmri_mini,synthetic,busi]", "evaluation.central=false"],
    ["privacy=dpsgd", "personalization=finetune"],
    ["method=linear_probe", "method.solver=lbfgs", "federation.num_sites=1"],
    ["partition=pathological", "partition.classes_per_site=4"],
    ["federation.secure_aggregation=true", "federation.num_sites=2"],
    ["federation.secure_aggregation=true", "federation.mode=deployment", "federation.min_sites=2"],
]


@pytest.mark.parametrize(("overrides", "sentence"), CROSS_CHECK_REFUSALS)
def test_each_cross_check_refuses_in_its_whole_sentence(overrides, sentence):
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config("quickstart", overrides))
    assert str(caught.value) == sentence


@pytest.mark.parametrize("overrides", CROSS_CHECK_EDGES_THAT_PASS)
def test_the_nearest_setting_each_cross_check_allows_passes(overrides):
    check_config(compose_config("quickstart", overrides))


def test_the_site_size_checks_refuse_at_their_edges_in_whole_sentences():
    dp = compose_config("quickstart", ["privacy=dpsgd", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError) as caught:
        check_site_sizes(dp, {"site-0": 9, "site-1": 10})
    assert str(caught.value) == (
        "Site site-0 holds 9 training images, fewer than the 10 DP-SGD needs for noise that does "
        "not drown every step; use fewer sites, more train.shots, or privacy=none."
    )
    check_site_sizes(dp, {"site-0": 10})
    at_one_over_n = compose_config(
        "quickstart", ["privacy=dpsgd", "privacy.noise_multiplier=1.0", "privacy.delta=0.05"]
    )
    with pytest.raises(ConfigError) as caught:
        check_site_sizes(at_one_over_n, {"site-0": 20})
    assert str(caught.value) == (
        "privacy.delta=0.05 is not below 1/n = 0.05 for site site-0 (20 training images): such a "
        "delta allows releasing a whole record; set it below 1/n or to null (1/(10 n))."
    )
    check_site_sizes(at_one_over_n, {"site-0": 19})
    with pytest.raises(ConfigError) as caught:
        check_site_sizes(compose_config("quickstart", []), {"site-0": 1, "site-1": 0})
    assert str(caught.value) == (
        "Site site-1 gets no training images (train.shots=0, partition=iid, 2 sites); use fewer "
        "sites, another partition or more shots."
    )
    check_site_sizes(compose_config("quickstart", []), {"site-0": 1})


def test_the_budget_check_uses_the_sites_own_delta_and_names_the_smallest_site_first():
    # A tiny epsilon the most noise meets only at the explicit, larger delta (not at 1/(10 n)).
    explicit = ["privacy=dpsgd", "privacy.epsilon=0.001", "privacy.delta=0.04"]
    check_site_sizes(compose_config("quickstart", explicit), {"site-0": 20})
    with pytest.raises(ConfigError, match=r"^Site site-0 \(20 training images\): privacy.epsilon"):
        check_site_sizes(compose_config("quickstart", explicit[:2]), {"site-0": 20})
    # Sites are checked from the smallest, so the refusal names the one furthest from enough.
    with pytest.raises(ConfigError, match=r"^Site site-1 holds 8 training images"):
        check_site_sizes(
            compose_config("quickstart", ["privacy=dpsgd"]), {"site-0": 9, "site-1": 8}
        )


def test_a_given_noise_multiplier_skips_the_budget_calibration():
    cfg = compose_config(
        "quickstart", ["privacy=dpsgd", "privacy.epsilon=1e9", "privacy.noise_multiplier=1.0"]
    )
    check_site_sizes(cfg, {"site-0": 40})


def test_sites_of_one_size_have_their_budget_calibrated_once(monkeypatch):
    """The calibration searches noise multipliers; fifty equal sites must not pay it fifty times."""
    schema = importlib.import_module("fedprompt.config_schema")
    calls = []
    real = schema.check_budget_reachable

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(schema, "check_budget_reachable", counted)
    dp = compose_config("quickstart", ["privacy=dpsgd"])
    check_site_sizes(dp, {f"site-{i}": 40 + 10 * (i % 2) for i in range(6)})
    assert len(calls) == 2  # sizes 40 and 50
