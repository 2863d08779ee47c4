"""The one validation pass: every bad value is one sentence naming the key, the value and the
allowed range, before anything starts; keys that must agree are checked together."""

import pytest

from fedprompt.backbones.preprocessing import NORMALIZATIONS
from fedprompt.cli import main
from fedprompt.config import ConfigError, compose_config
from fedprompt.config_schema import COMMON, MIN_DP_RECORDS, check_config, check_site_sizes


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
        ConfigError, match=f"site-1 holds 6 training images, fewer than the {MIN_DP_RECORDS}"
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
