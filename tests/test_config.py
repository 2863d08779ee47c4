import pytest
from omegaconf.errors import ReadonlyConfigError

from fedprompt.config import ConfigError, compose_config, list_choices


def test_experiments_are_listed():
    assert {"quickstart", "btmri_5sites"} <= set(list_choices("experiment"))


def test_quickstart_composes_offline_defaults():
    cfg = compose_config("quickstart")
    assert cfg.experiment_name == "quickstart"
    assert cfg.backbone.spec == "miniature"
    assert cfg.dataset.name == "btmri_mini"
    assert cfg.method.name == "coop" and cfg.method.n_ctx == 4


def test_main_experiment_uses_biomedclip_and_five_sites():
    cfg = compose_config("btmri_5sites")
    assert cfg.backbone.spec == "biomedclip"
    assert cfg.federation.num_sites == 5
    assert cfg.partition.name == "dirichlet"


@pytest.mark.parametrize(
    "group",
    ["backbone", "dataset", "method", "partition", "strategy", "privacy", "protocol", "recipe"],
)
def test_every_group_file_is_named_by_its_name_key(group):
    for choice in list_choices(group):
        overrides = [f"{group}={choice}"]
        if choice == "local_dir":
            overrides.append("backbone.path=/models/biomedclip")
        assert compose_config(None, overrides)[group].name == choice


def test_local_dir_backbone_spec_carries_the_path():
    cfg = compose_config(None, ["backbone=local_dir", "backbone.path=/models/biomedclip"])
    assert cfg.backbone.spec == "local-dir:/models/biomedclip"


def test_composed_config_is_read_only():
    cfg = compose_config("quickstart")
    with pytest.raises(ReadonlyConfigError):
        cfg.seed = 3


def test_unknown_experiment_says_which_exist():
    with pytest.raises(ConfigError, match="quickstart"):
        compose_config("no-such-experiment")


def test_bad_key_is_one_clear_error():
    with pytest.raises(ConfigError, match="Cannot compose"):
        compose_config("quickstart", ["federation.no_such_key=3"])


def test_a_removed_group_section_is_refused_in_one_sentence():
    with pytest.raises(ConfigError) as caught:
        compose_config("quickstart", ["~privacy"])
    assert str(caught.value) == (
        "The config has no privacy section; every run needs one, so choose it with "
        "privacy=NAME (one of dpsgd, none, site_level)."
    )
    with pytest.raises(ConfigError, match=r"^The config has no partition section"):
        compose_config("quickstart", ["~partition"])


@pytest.mark.parametrize(
    ("overrides", "shown", "loaded"),
    [
        (["privacy=dpsgd", "privacy.name=none"], "none", "dpsgd"),
        (["partition.name=dirichlet"], "dirichlet", "iid"),
        (["personalization.name=null"], "null", "none"),
    ],
)
def test_a_group_renamed_without_loading_its_file_is_refused(overrides, shown, loaded):
    group = overrides[-1].partition(".")[0]
    with pytest.raises(ConfigError) as caught:
        compose_config("quickstart", overrides)
    assert str(caught.value) == (
        f"{group}.name={shown} disagrees with the {group} config loaded ({loaded}); choose a "
        f"{group} with {group}=NAME, not by setting {group}.name."
    )
