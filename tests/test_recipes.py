"""recipe=paper resolves to the authors' released values; recipe=federated changes nothing."""

import pytest
from omegaconf import OmegaConf

from fedprompt.config import CONFIG_DIR, ConfigError, compose_config, list_choices
from fedprompt.config_schema import check_config
from fedprompt.recipes import recipe_values

DASSL = {
    "weight_decay": 5e-4,
    "momentum": 0.9,
    "lr_schedule": "cosine",
    "warmup_epochs": 1,
    "lr_step": "epoch",
}

# Written by hand from the authors' files (HealthX-Lab/BiomedCoOp configs/trainers/<Method>/...,
# tientrandinh/OGKD configs/trainers/OGKD/..., mainaksingha01/BioVLM configs/trainers/biomed.yaml,
# Dassl's defaults): (method, protocol, dataset) -> lr, batch, epochs, train extras, method keys.
PAPER = {
    ("biomedcoop", "few_shot", "btmri"): (
        0.0025, 4, 100, DASSL, {"sccm_weight": 0.5, "kdsp_weight": 0.25, "tau": 1.5}
    ),
    ("biomedcoop", "base_to_novel", "btmri"): (
        0.0025, 4, 50, DASSL, {"sccm_weight": 0.5, "kdsp_weight": 0.5, "tau": 1.25}
    ),
    ("biomedcoop", "few_shot", "kneexray"): (
        0.0025, 4, 100, DASSL, {"sccm_weight": 5.0, "kdsp_weight": 20.0, "tau": 1.75}
    ),
    ("ogkd", "few_shot", "btmri"): (
        0.0025, 4, 100, DASSL,
        {"alpha": 4.0, "gamma": 0.5, "sccm_weight": 0.5, "gad_weight": 1.75, "lgd_weight": 0.05,
         "top_k_ratio": 0.4, "tau": 1.5},
    ),
    ("ogkd", "base_to_novel", "btmri"): (
        0.0025, 4, 50, DASSL,
        {"alpha": 1.0, "gamma": 0.8, "sccm_weight": 0.5, "gad_weight": 0.5, "lgd_weight": 0.01,
         "top_k_ratio": 0.5, "tau": 1.25},
    ),
    ("kgcoop", "few_shot", "btmri"): (0.002, 128, 100, DASSL, {"kg_weight": 2.0}),
    ("kgcoop", "few_shot", "busi"): (0.002, 128, 100, DASSL, {"kg_weight": 10.0}),
    ("kgcoop", "base_to_novel", "btmri"): (0.002, 128, 50, DASSL, {"kg_weight": 8.0}),
    ("prograd", "few_shot", "btmri"): (0.002, 128, 100, DASSL, {"temperature": 2.0}),
    ("prograd", "base_to_novel", "btmri"): (0.0015, 128, 50, DASSL, {"temperature": 1.0}),
    ("coop", "few_shot", "btmri"): (0.002, 32, 100, DASSL, {"n_ctx": 4}),
    ("coop", "base_to_novel", "btmri"): (0.002, 32, 50, DASSL, {"n_ctx": 4}),
    ("cocoop", "few_shot", "btmri"): (0.001, 1, 10, DASSL, {"n_ctx": 4}),
    ("cocoop", "base_to_novel", "btmri"): (0.001, 1, 10, DASSL, {"n_ctx": 4}),
    ("clip_adapter", "few_shot", "btmri"): (
        0.01, 32, 20,
        {"weight_decay": 0.0, "momentum": 0.0, "lr_schedule": "cosine", "warmup_epochs": 1,
         "lr_step": "batch"},
        {"ratio": 0.5},
    ),
    ("biovlm", "few_shot", "btmri"): (0.002, 32, 50, DASSL, {"n_ctx": 4}),
}  # fmt: skip


@pytest.mark.parametrize(("method", "protocol", "dataset"), sorted(PAPER))
def test_paper_recipe_resolves_to_the_authors_values(method, protocol, dataset):
    lr, batch, epochs, train, weights = PAPER[method, protocol, dataset]
    cfg = compose_config(
        None, ["recipe=paper", f"method={method}", f"protocol={protocol}", f"dataset={dataset}"]
    )
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_lr) == (lr, batch, 1e-5)
    assert cfg.federation.rounds * cfg.train.local_epochs == epochs
    assert cfg.train.local_epochs == 1  # one paper epoch a round
    assert {key: cfg.train[key] for key in train} == train
    assert {key: cfg.method[key] for key in weights} == weights


def test_augmentation_flips_only_where_the_authors_flip():
    def augmentation(method):
        return compose_config(None, ["recipe=paper", f"method={method}"]).features

    biomedcoop, biovlm, adapter = (
        augmentation(m) for m in ("biomedcoop", "biovlm", "clip_adapter")
    )
    assert biomedcoop.views > 1 and not biomedcoop.augmentation.hflip
    assert list(biomedcoop.augmentation.scale) == [0.08, 1.0]
    assert biovlm.augmentation.hflip
    assert adapter.augmentation.hflip and list(adapter.augmentation.scale) == [0.5, 1.0]
    assert biovlm.normalization == "imagenet"  # INPUT.PIXEL_MEAN/STD in BioVLM's config
    assert biomedcoop.normalization == adapter.normalization == "backbone"


def test_federated_recipe_is_todays_config():
    default = compose_config()
    assert OmegaConf.to_container(compose_config(None, ["recipe=federated"])) == (
        OmegaConf.to_container(default)
    )
    assert default.recipe.name == "federated"
    assert dict(default.train) == {
        "shots": 0,
        "local_epochs": 1,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.002,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "warmup_epochs": 0,
        "warmup_lr": 1e-5,
        "lr_step": "epoch",
    }
    assert default.features.views == 1 and default.federation.rounds == 10


def test_command_line_keys_win_over_the_recipe():
    cfg = compose_config(
        "btmri_5sites",
        ["recipe=paper", "method=kgcoop", "train.lr=0.01", "method.kg_weight=3.0"],
    )
    assert (cfg.train.lr, cfg.method.kg_weight, cfg.train.batch_size) == (0.01, 3.0, 128)
    assert cfg.federation.rounds == 100  # the recipe wins over the experiment file's 20
    chosen = compose_config(None, ["recipe=paper", "method=coop", "train.local_epochs=3"])
    assert (chosen.train.local_epochs, chosen.federation.rounds) == (3, 34)  # ceil(100 / 3)
    rounds = compose_config(None, ["recipe=paper", "method=coop", "federation.rounds=7"])
    assert (rounds.train.local_epochs, rounds.federation.rounds) == (1, 7)


def test_datasets_without_a_section_keep_the_method_defaults():
    cfg = compose_config(None, ["recipe=paper", "method=biomedcoop", "dataset=breastmnist"])
    defaults = compose_config(None, ["method=biomedcoop"]).method
    assert (cfg.train.lr, cfg.method.sccm_weight) == (0.0025, defaults.sccm_weight)


def test_every_method_has_a_table_and_every_section_composes_and_validates():
    folder = CONFIG_DIR / "recipe" / "paper"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == list_choices("method")
    for method in list_choices("method"):
        table = OmegaConf.to_container(OmegaConf.load(folder / f"{method}.yaml"))
        for protocol in list_choices("protocol"):
            datasets = set(table.get(protocol) or {}) - {"all"} or {"btmri"}
            for dataset in sorted(datasets & set(list_choices("dataset"))):
                overrides = [f"method={method}", f"protocol={protocol}", f"dataset={dataset}"]
                # The papers' rows are centralized: one site holds the training split.
                centralized = ["federation.num_sites=1", "partition=iid"]
                cfg = compose_config(None, ["recipe=paper", *centralized, *overrides])
                check_config(cfg)
                for key, value in recipe_values("paper", method, protocol, dataset).items():
                    if key != "epochs":
                        assert OmegaConf.select(cfg, key) == value, (overrides, key)


def test_a_recipe_without_a_table_for_the_method_says_which_it_covers(tmp_path, monkeypatch):
    import fedprompt.recipes as recipes

    (tmp_path / "recipe" / "paper").mkdir(parents=True)
    (tmp_path / "recipe" / "paper" / "coop.yaml").write_text("all: {train.no_such_key: 1}\n")
    monkeypatch.setattr(recipes, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match="covers coop"):
        recipe_values("paper", "ogkd", "few_shot", "btmri")
    cfg = OmegaConf.create(
        {"recipe": {"name": "paper"}, "method": {"name": "coop"}, "train": {"lr": 1.0},
         "protocol": {"name": "few_shot"}, "dataset": {"name": "btmri"}}
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"sets train\.no_such_key"):
        recipes.apply_recipe(cfg, [])
