"""From a run's config to the images each simulated site holds: data, partition, shots, scanner."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedprompt.backbones import default_cache_dir
from fedprompt.config import CONFIG_DIR, ConfigError, compose_config, list_choices
from fedprompt.data.acquisition import AcquisitionProfile, site_profiles
from fedprompt.data.few_shot import few_shot_indices
from fedprompt.data.image_set import DatasetSplits, ImageSet, resolve_root
from fedprompt.data.natural_sites import manifest_path, natural_partition
from fedprompt.data.partition import SitePartition, assign_sites, partitions_report
from fedprompt.data.registry import load_dataset

logger = logging.getLogger(__name__)

SYNTHETIC_CONFIG = CONFIG_DIR / "dataset" / "synthetic.yaml"
PARTITION_PARAMS = ("alpha", "min_size", "classes_per_site")
SITE_VIEWS = "acquisition.png"


@dataclass(frozen=True)
class SiteData:
    """One site's own images: a training shard (few-shot sampled) and a test shard."""

    name: str
    index: int
    classnames: list[str]
    train: ImageSet
    test: ImageSet


def _synthetic_stand_in(dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``configs/dataset/synthetic.yaml`` (its sizes and seed) under the absent dataset's classes.

    It is generated in fedprompt's cache, not beside the yaml's working-folder root, so one copy
    serves runs started from any folder.
    """
    stand_in = OmegaConf.to_container(OmegaConf.load(SYNTHETIC_CONFIG), resolve=True)
    assert isinstance(stand_in, dict)
    classnames = list(dataset_cfg["classnames"])
    stand_in.update(
        name=f"synthetic-{dataset_cfg['name']}",
        classnames=classnames,
        num_classes=len(classnames),
        root=str(default_cache_dir() / "synthetic"),
    )
    return stand_in


def _shipped_root(name: str) -> Any:
    """The root a dataset's own config file sets (``configs/dataset/<name>.yaml``), if any."""
    path = CONFIG_DIR / "dataset" / f"{name}.yaml"
    return OmegaConf.load(path).get("root") if path.is_file() else None


def uses_stand_in(dataset_cfg: Mapping[str, Any]) -> bool:
    """Whether a run on this dataset section gets the generated stand-in instead of images.

    Only a ready-made offline dataset (``synthetic_fallback: true``) whose shipped folder is
    absent does: a root the user chose that does not exist is an error, never a silent swap.
    """
    root = dataset_cfg.get("root")
    return bool(
        dataset_cfg.get("synthetic_fallback")
        and root is not None
        and str(root) == str(_shipped_root(str(dataset_cfg["name"])))
        and not resolve_root(root).exists()
    )


def dataset_name(cfg: DictConfig) -> str:
    """What a run's sites train on: the dataset's name, or ``synthetic-<name>`` for the stand-in.

    Unlike ``dataset_config`` it says nothing: the stand-in's warning is given where the data
    is read.
    """
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert isinstance(dataset_cfg, dict)
    name = str(dataset_cfg["name"])
    return f"synthetic-{name}" if uses_stand_in(dataset_cfg) else name


def dataset_config(cfg: DictConfig) -> dict[str, Any]:
    """The dataset section with its root resolved, or the synthetic stand-in where it applies.

    The stand-in (``uses_stand_in``) is named ``synthetic-<dataset>``, so the results say what
    the run trained on.
    """
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert isinstance(dataset_cfg, dict)
    if uses_stand_in(dataset_cfg):
        logger.warning(
            "Dataset folder %s is absent; this run uses synthetic-%s, a small generated set with "
            "the same classes, not real images.",
            resolve_root(dataset_cfg["root"]),
            dataset_cfg["name"],
        )
        return _synthetic_stand_in(dataset_cfg)
    if dataset_cfg.get("root") is not None:
        dataset_cfg["root"] = str(resolve_root(dataset_cfg["root"]))
    return dataset_cfg


def with_dataset(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` with its ``dataset`` section replaced by ``configs/dataset/<name>.yaml``.

    For a site or an evaluation that reads another dataset than the run's own (sites with
    different tasks, unseen datasets).

    Raises:
        ConfigError: No such dataset config.
    """
    if not (CONFIG_DIR / "dataset" / f"{name}.yaml").is_file():
        offered = ", ".join(list_choices("dataset"))
        raise ConfigError(f"dataset {name} is not one of fedprompt's dataset configs ({offered}).")
    other = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(other, dict)
    # Composed, not loaded: a dataset file may extend another (btmri_mini extends btmri).
    composed = compose_config(None, [f"dataset={name}"])
    section = OmegaConf.to_container(composed.dataset, resolve=True)
    assert isinstance(section, dict)
    other["dataset"] = section
    return OmegaConf.create(other)


def load_splits(cfg: DictConfig) -> DatasetSplits:
    """The dataset's train/val/test splits for a run's config."""
    return load_dataset(dataset_config(cfg))


def partition_params(cfg: DictConfig) -> dict[str, Any]:
    """The partitioner's keyword arguments from ``cfg.partition`` (those it defines)."""
    return {key: cfg.partition[key] for key in PARTITION_PARAMS if key in cfg.partition}


def plan_sites(cfg: DictConfig, splits: DatasetSplits) -> SitePartition:
    """Deterministic assignment of train and test images to ``federation.num_sites`` sites.

    ``partition=natural`` takes the sites from the dataset's manifest; every other scheme cuts
    the training split by its labels.
    """
    if str(cfg.partition.name) == "natural":
        return natural_partition(dataset_config(cfg), splits, int(cfg.federation.num_sites))
    return assign_sites(
        splits.train.labels,
        splits.test.labels,
        int(cfg.federation.num_sites),
        str(cfg.partition.name),
        int(cfg.seed),
        **partition_params(cfg),
    )


def acquisition_profiles(cfg: DictConfig, num_sites: int) -> list[AcquisitionProfile] | None:
    """Each site's simulated scanner under ``partition.acquisition``; None when it is off."""
    return site_profiles(_acquisition(cfg), int(cfg.seed), num_sites)


def _acquisition(cfg: DictConfig) -> str:
    """``partition.acquisition``; ``none`` where a config (a deployed site's) has no such key."""
    return str(cfg.partition.get("acquisition") or "none")


def site_train_indices(
    cfg: DictConfig, splits: DatasetSplits, plan: SitePartition, index: int
) -> np.ndarray:
    """Indices into the train split that site ``index`` trains on: its shard, few-shot sampled.

    ``train.shots`` images per class are drawn from the site's own shard with seed
    ``seed + index``, so sites draw independently and a run is repeatable.
    """
    shard = np.asarray(plan.train[index])
    shots = int(cfg.train.shots)
    if shots <= 0:
        return shard
    return shard[few_shot_indices(splits.train.labels[shard], shots, int(cfg.seed) + index)]


def site_data(cfg: DictConfig, splits: DatasetSplits, plan: SitePartition, index: int) -> SiteData:
    """Site ``index``'s images: its (few-shot) training images and its own test images.

    Under ``partition.acquisition=scanner`` both are seen through the site's own profile.
    """
    if not 0 <= index < len(plan.site_names):
        raise ValueError(f"Site index {index} is outside 0..{len(plan.site_names) - 1}.")
    profiles = acquisition_profiles(cfg, len(plan.site_names))
    profile = None if profiles is None else profiles[index]
    train = splits.train.subset(site_train_indices(cfg, splits, plan, index))
    return SiteData(
        name=plan.site_names[index],
        index=index,
        classnames=list(splits.classnames),
        train=train.with_acquisition(profile),
        test=splits.test.subset(plan.test[index]).with_acquisition(profile),
    )


def plan_report(cfg: DictConfig, splits: DatasetSplits, plan: SitePartition) -> dict[str, Any]:
    """What ``partitions.json`` holds: the images each site really uses, with histograms.

    Also each site's acquisition profile (null when ``partition.acquisition=none``) and, under
    ``partition=natural``, the manifest the sites come from.
    """
    used = SitePartition(
        site_names=plan.site_names,
        train=[site_train_indices(cfg, splits, plan, i) for i in range(len(plan.site_names))],
        test=plan.test,
    )
    params: dict[str, Any] = {"seed": int(cfg.seed), "shots": int(cfg.train.shots)}
    if str(cfg.partition.name) == "natural":
        params["manifest"] = str(manifest_path(dataset_config(cfg)))
    else:
        params.update(partition_params(cfg))
    report = partitions_report(
        used,
        splits.train.labels,
        splits.test.labels,
        splits.classnames,
        str(cfg.partition.name),
        params,
    )
    profiles = acquisition_profiles(cfg, len(plan.site_names))
    report["acquisition"] = _acquisition(cfg)
    for index, site in enumerate(report["sites"]):
        site["acquisition"] = None if profiles is None else profiles[index].record()
    return report


def write_site_views(
    cfg: DictConfig, splits: DatasetSplits, plan: SitePartition, folder: str | Path
) -> Path | None:
    """``acquisition.png`` in ``folder``: one test image as stored and as each site sees it.

    Written only under ``partition.acquisition=scanner``, so a person can see what the simulated
    scanners do before reading any number; returns its path, or None when nothing was written.
    """
    profiles = acquisition_profiles(cfg, len(plan.site_names))
    if profiles is None:
        return None
    from fedprompt.evaluation.plots import site_views  # matplotlib: only when there is a plot

    images = splits.test if len(splits.test) else splits.train
    image, _ = images.with_transform(None)[0]
    target = Path(folder) / SITE_VIEWS
    site_views(image, images.identities[0], profiles, plan.site_names, target)
    return target
