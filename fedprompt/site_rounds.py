"""What one site does in a round, as plain functions the Flower ClientApp and tests call.

Everything heavy is loaded once per process and shared by every site that process serves: the
frozen backbone (``load_backbone``'s cache), the dataset index and partition plan (memoised
here), and the encoded image features (``PROCESS_FEATURE_CACHE``, in memory within the
``features`` budgets and on disk), so peak memory does not grow with the number of sites.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedprompt.backbones import Backbone, load_backbone
from fedprompt.config import ConfigError
from fedprompt.data.features import PROCESS_FEATURE_CACHE, CachedViews, FeatureSettings
from fedprompt.data.few_shot import few_shot_indices
from fedprompt.data.image_set import DatasetSplits, ImageSet
from fedprompt.data.partition import SitePartition
from fedprompt.data.protocols import training_splits
from fedprompt.data.sites import (
    SiteData,
    load_splits,
    plan_sites,
    site_data,
    site_train_indices,
    with_dataset,
)
from fedprompt.evaluation.membership_inference import membership_inference_auc
from fedprompt.evaluation.metrics import ClassificationMetrics, classification_metrics
from fedprompt.learners import Learner, create_learner
from fedprompt.learners.linear_probe import LinearProbe
from fedprompt.personalization import Personalization, personalization_from_config, split_state
from fedprompt.personalization.attach import LOCAL_MODULE, LocalLoss, attach_local_prompt
from fedprompt.personalization.finetune import FineTune
from fedprompt.privacy.dp_training import dp_train_local
from fedprompt.privacy.ledger import SiteLedger, load_or_plan_ledger
from fedprompt.training import ProximalTerm, TrainStats, evaluate, required_inputs, train_local


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA where present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA GPU is visible; use device=cpu.")
    return torch.device(name)


def feature_settings(cfg: DictConfig) -> FeatureSettings:
    """The run's ``features`` section (defaults where a config has none)."""
    section = cfg.get("features")
    return FeatureSettings.from_config(
        OmegaConf.to_container(section, resolve=True) if section is not None else None
    )


def backbone_for(cfg: DictConfig) -> Backbone:
    """The process's shared frozen backbone for this config.

    Also sets the process feature cache's folder and budgets from the config's ``features``
    section, so that every process of a run (sites, and the server's central evaluation) caches
    features where and as the run says.
    """
    PROCESS_FEATURE_CACHE.configure(feature_settings(cfg))
    return load_backbone(str(cfg.backbone.spec), resolve_device(str(cfg.device)))


def build_learner(cfg: DictConfig, backbone: Backbone, classnames: list[str]) -> Learner:
    """The configured method's learner; every ``method`` key but ``name`` is a hyperparameter."""
    hparams = OmegaConf.to_container(cfg.method, resolve=True)
    assert isinstance(hparams, dict)
    name = hparams.pop("name")
    return create_learner(name, backbone, classnames, **hparams)


@functools.lru_cache(maxsize=8)
def _splits_and_plan(data_yaml: str) -> tuple[DatasetSplits, SitePartition]:
    data_cfg = OmegaConf.create(data_yaml)
    splits = training_splits(data_cfg.get("protocol"), load_splits(data_cfg))
    return splits, plan_sites(data_cfg, splits)


def splits_and_plan(cfg: DictConfig) -> tuple[DatasetSplits, SitePartition]:
    """The dataset index the sites see and their assignment, read once per process.

    Under ``protocol=base_to_novel`` the index holds the base classes only (``training_splits``).
    Keyed on the only keys they depend on, so changing a training setting reuses them.
    """
    data_cfg = {
        "dataset": cfg.dataset,
        "protocol": cfg.get("protocol"),
        "partition": cfg.partition,
        "federation": {"num_sites": cfg.federation.num_sites},
        "seed": cfg.seed,
    }
    return _splits_and_plan(OmegaConf.to_yaml(data_cfg))


def site_tasks(cfg: DictConfig) -> list[str]:
    """``federation.site_datasets``: the dataset each simulated site holds (empty: one shared)."""
    return [str(name) for name in cfg.federation.get("site_datasets") or []]


def task_config(cfg: DictConfig, site_index: int) -> DictConfig:
    """The config site ``site_index`` of a federation of different tasks trains with.

    Its own dataset, held whole by one site (``federation.site_datasets``), with its own class
    list; everything else is the run's. Few-shot draws are seeded per site, as in any run.
    """
    name = site_tasks(cfg)[site_index]
    own = OmegaConf.to_container(with_dataset(cfg, name), resolve=True)
    assert isinstance(own, dict)
    own["federation"].update(num_sites=1, site_datasets=None)
    own["partition"] = {"name": "iid"}
    own["seed"] = int(cfg.seed) + site_index
    return OmegaConf.create(own)


def site_train_sizes(cfg: DictConfig) -> dict[str, int]:
    """Each simulated site's number of training images (after few-shot sampling), by name."""
    sizes = {}
    for index in range(len(site_tasks(cfg))):  # each its own dataset; no backbone needed
        own = task_config(cfg, index)
        splits, plan = splits_and_plan(own)
        sizes[f"site-{index}"] = len(site_train_indices(own, splits, plan, 0))
    if sizes:
        return sizes
    splits, plan = splits_and_plan(cfg)
    return {
        name: len(site_train_indices(cfg, splits, plan, index))
        for index, name in enumerate(plan.site_names)
    }


@dataclass(frozen=True)
class SiteSession:
    """A site's backbone, images and encoded features for one round."""

    cfg: DictConfig
    backbone: Backbone
    data: SiteData

    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of the site's ``train`` or ``test`` images under the eval transform."""
        images = self.data.train if split == "train" else self.data.test
        settings = feature_settings(self.cfg)
        return PROCESS_FEATURE_CACHE.get(
            self.backbone, images, settings.batch_size, normalization=settings.normalization
        )

    def test_patch_tokens(self) -> torch.Tensor:
        """fp16 patch tokens (N, P, D) of the site's test images under the eval transform."""
        settings = dataclasses.replace(feature_settings(self.cfg), views=1)
        cached = PROCESS_FEATURE_CACHE.training_views(
            self.backbone, self.data.test, settings, patch_tokens=True
        )
        assert cached.patch_tokens is not None
        return cached.patch_tokens[0]

    def training_views(self, patch_tokens: bool = False) -> CachedViews:
        """The ``features.views`` cached views of the training images, and patch tokens if asked."""
        return PROCESS_FEATURE_CACHE.training_views(
            self.backbone, self.data.train, feature_settings(self.cfg), patch_tokens=patch_tokens
        )

    def learner(self, global_state: Mapping[str, torch.Tensor | np.ndarray]) -> Learner:
        """A learner holding the global trainable state the server sent."""
        learner = build_learner(self.cfg, self.backbone, self.data.classnames)
        learner.load_trainable_state(global_state)
        return learner


def open_site(cfg: DictConfig, site_index: int) -> SiteSession:
    """Everything site ``site_index`` needs, from the per-process caches.

    Under ``federation.site_datasets`` the site holds its own dataset, with its own classes.
    """
    if site_tasks(cfg):
        own = task_config(cfg, site_index)
        splits, plan = splits_and_plan(own)
        data = dataclasses.replace(
            site_data(own, splits, plan, 0), name=f"site-{site_index}", index=site_index
        )
        return SiteSession(own, backbone_for(own), data)
    splits, plan = splits_and_plan(cfg)
    return SiteSession(cfg, backbone_for(cfg), site_data(cfg, splits, plan, site_index))


def round_seed(cfg: DictConfig, server_round: int, site_index: int) -> int:
    """The seed of a site's round: batch order, views, and DP draws where deterministic."""
    return int(
        np.random.SeedSequence([int(cfg.seed), server_round, site_index]).generate_state(1)[0]
    )


def privacy_mode(cfg: DictConfig) -> str:
    """The run's ``privacy.name``; a config without a privacy section fails, never runs as none."""
    return str(cfg.privacy.name)


def personalization_for(cfg: DictConfig) -> Personalization:
    """The run's personalization scheme (``none`` where a config has no such section)."""
    section = cfg.get("personalization")
    if section is None:
        return personalization_from_config(None)
    settings = OmegaConf.to_container(section, resolve=True)
    assert isinstance(settings, dict)
    return personalization_from_config(settings)


def local_generator(cfg: DictConfig, site_index: int) -> torch.Generator:
    """The seeded stream a site's fresh local part is drawn from (the same in every round)."""
    seed = np.random.SeedSequence([int(cfg.seed), site_index, 1]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


@dataclass(frozen=True)
class RoundUpdate:
    """What a site's round produced.

    Attributes:
        global_state: The tensors that go to the server: the global part only.
        local_state: The site's own tensors, kept at the site (None: the scheme keeps none).
        stats: The round's training statistics.
    """

    global_state: dict[str, torch.Tensor]
    local_state: dict[str, torch.Tensor] | None
    stats: TrainStats


def _tensors(state: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        for k, v in state.items()
    }


def train_round(
    cfg: DictConfig,
    site_index: int,
    global_state: Mapping[str, torch.Tensor | np.ndarray],
    server_round: int,
    *,
    proximal_mu: float = 0.0,
    ledger: SiteLedger | None = None,
    local_state: Mapping[str, torch.Tensor] | None = None,
) -> RoundUpdate:
    """Train the global prompt (and the site's own part) on this site's images.

    Patch tokens are cached only when the configured learner's ``required_inputs`` name them; a
    learner with nothing to train (``needs_training`` false) encodes nothing and takes no step.
    With a privacy ``ledger`` the round is sample-level DP-SGD (``dp_train_local``) counted
    against it, and the stats are ``DPTrainStats``; with FedProx's ``proximal_mu`` the learner's
    loss gets the proximal term, on the global tensors only.

    Under a personalization scheme ``local_state`` is the site's own part as it last kept it
    (None before its first round): ``local_only`` trains that copy and returns the global prompt
    untouched; the context schemes train the global and the local part together and return the
    global part; the local part comes back in ``RoundUpdate.local_state`` and never leaves.

    Raises:
        ConfigError: DP-SGD together with FedProx (the proximal term is not wired into the
            private step).
    """
    session = open_site(cfg, site_index)
    scheme = personalization_for(cfg)
    learner = session.learner(global_state)
    if not getattr(learner, "needs_training", True):
        stats = TrainStats(0.0, len(session.data.train), 0, 0.0)
        return RoundUpdate(learner.trainable_state(), None, stats)
    if isinstance(learner, LinearProbe) and learner.solver == "lbfgs":
        state, stats = fit_probe(session, learner)
        return RoundUpdate(state, None, stats)
    if not scheme.trains_global and local_state:
        learner.load_trainable_state(local_state)
    attach_local_prompt(scheme, learner, local_state, local_generator(cfg, site_index))
    shared_keys = list(global_state) if scheme.trains_global else []
    trainee = ProximalTerm(learner, proximal_mu, shared_keys) if proximal_mu > 0 else learner
    if scheme.needs_context:
        trainee = LocalLoss(trainee, learner)
    views = session.training_views(patch_tokens="patch_tokens" in required_inputs(trainee))
    seed = round_seed(cfg, server_round, site_index)
    torch.manual_seed(seed)
    if ledger is not None:
        if proximal_mu > 0:
            raise ConfigError(
                "privacy=dpsgd does not combine with strategy=fedprox; choose fedavg or fedadam."
            )
        privacy = OmegaConf.to_container(cfg.privacy, resolve=True)
        assert isinstance(privacy, dict)
        stats: TrainStats = dp_train_local(
            learner,
            views.features,
            views.labels,
            cfg.train,
            privacy,
            ledger,
            seed,
            patch_tokens=views.patch_tokens,
            server_round=server_round,
            num_rounds=int(cfg.federation.rounds),
        )
        return RoundUpdate(learner.trainable_state(), None, stats)
    stats = train_local(
        trainee,  # type: ignore[arg-type]
        views.features,
        views.labels,
        cfg.train,
        seed,
        patch_tokens=views.patch_tokens,
        server_round=server_round,
        num_rounds=int(cfg.federation.rounds),
    )
    if not scheme.trains_global:
        return RoundUpdate(_tensors(global_state), learner.trainable_state(), stats)
    shared, own = split_state(learner.trainable_state())
    return RoundUpdate(shared, own or None, stats)


def validation_images(cfg: DictConfig) -> ImageSet:
    """The validation images the papers choose hyperparameters on: ``min(shots, 4)`` per class.

    As in CoOp's and BiomedCoOp's few-shot sampling (all of them with ``train.shots=0``).

    Raises:
        ConfigError: The dataset has no validation split.
    """
    splits, _ = splits_and_plan(cfg)
    if splits.val is None or len(splits.val) == 0:
        raise ConfigError(
            f"dataset={cfg.dataset.name} has no validation split to choose the L-BFGS probe's C "
            "on; use method.solver=sgd."
        )
    shots = int(cfg.train.shots)
    if shots <= 0:
        return splits.val
    return splits.val.subset(few_shot_indices(splits.val.labels, min(shots, 4), int(cfg.seed)))


def fit_probe(
    session: SiteSession, learner: LinearProbe
) -> tuple[dict[str, torch.Tensor], TrainStats]:
    """The papers' linear probe: one L-BFGS fit per C on the site's features, C chosen on val.

    The features are the eval-transform ones (no augmentation), as in CLIP's protocol; the
    round's global state is not used, as the fit starts from scratch. The loss reported is
    ``1 - validation accuracy`` of the chosen C, there being no training loss to average.
    """
    start = time.perf_counter()
    train_x, train_y = session.features("train")
    settings = feature_settings(session.cfg)
    val_x, val_y = PROCESS_FEATURE_CACHE.get(
        session.backbone,
        validation_images(session.cfg),
        settings.batch_size,
        normalization=settings.normalization,
    )
    fit = learner.fit_lbfgs(train_x, train_y, val_x, val_y)
    stats = TrainStats(1.0 - fit.val_accuracy, len(train_y), 0, time.perf_counter() - start)
    return learner.trainable_state(), stats


def plan_ledger(
    cfg: DictConfig,
    site_index: int,
    *,
    state: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
) -> SiteLedger | None:
    """The site's privacy ledger under ``privacy=dpsgd`` (saved or newly planned), else None."""
    if privacy_mode(cfg) != "dpsgd":
        return None
    privacy = OmegaConf.to_container(cfg.privacy, resolve=True)
    assert isinstance(privacy, dict)
    num_records = len(open_site(cfg, site_index).data.train)
    return load_or_plan_ledger(
        privacy,
        cfg.train,
        int(cfg.federation.rounds),
        num_records,
        state=state,
        path=path,
    )


@dataclass(frozen=True)
class SiteEvaluation:
    """A site's scores of the global prompt, and of its own under a personalization scheme.

    Attributes:
        metrics: The global prompt's test metrics.
        mia_auc: The membership attack's AUC, where asked for.
        personalized: The site's personalized prompt's test metrics (None without a scheme).
    """

    metrics: ClassificationMetrics
    mia_auc: float | None = None
    personalized: ClassificationMetrics | None = None


def personalized_learner(
    session: SiteSession,
    global_state: Mapping[str, torch.Tensor | np.ndarray],
    local_state: Mapping[str, torch.Tensor] | None,
) -> Learner:
    """The prompt this site would use itself, under the run's personalization scheme.

    Its own copy (``local_only``), the global prompt with its local part, or (``finetune``) the
    global prompt fine-tuned on its own training images. A site that never trained its part (not
    sampled yet) scores the part it starts from.
    """
    scheme = personalization_for(session.cfg)
    site_index = session.data.index
    if not scheme.trains_global:
        return session.learner(local_state or global_state)
    learner = session.learner(global_state)
    attach_local_prompt(scheme, learner, local_state, local_generator(session.cfg, site_index))
    if isinstance(scheme, FineTune):
        views = session.training_views(patch_tokens="patch_tokens" in required_inputs(learner))
        settings = OmegaConf.to_container(session.cfg.train, resolve=True)
        assert isinstance(settings, dict)
        settings.update(local_epochs=scheme.local_epochs, lr_schedule="constant", warmup_epochs=0)
        seed = int(
            np.random.SeedSequence([int(session.cfg.seed), site_index, 2]).generate_state(1)[0]
        )
        torch.manual_seed(seed)
        train_local(learner, views.features, views.labels, settings, seed)
    return learner


@torch.no_grad()
def personalized_metrics(
    session: SiteSession, learner: Learner, features: torch.Tensor, labels: torch.Tensor
) -> ClassificationMetrics:
    """Test metrics of the site's personalized learner.

    A local part with logits of its own (FedOTP's transport over patch tokens) is scored on the
    test images' patch tokens, in batches; any other learner on the pooled features.
    """
    part = getattr(learner, LOCAL_MODULE, None)
    num_classes = len(session.data.classnames)
    if part is None or not part.required_inputs:
        return evaluate(learner, features, labels, num_classes)
    learner.eval()
    tokens = session.test_patch_tokens()
    encoder, ctx, scale = learner.prompt_encoder, learner.ctx, session.backbone.logit_scale()
    predictions = [
        part.own_logits(encoder, ctx, scale, patch_tokens=tokens[begin : begin + 64])
        .argmax(dim=1)
        .cpu()
        for begin in range(0, len(tokens), 64)
    ]
    return classification_metrics(labels.numpy(), torch.cat(predictions).numpy(), num_classes)


def evaluate_session(
    session: SiteSession,
    global_state: Mapping[str, torch.Tensor | np.ndarray],
    local_state: Mapping[str, torch.Tensor] | None = None,
) -> SiteEvaluation:
    """Score the global prompt, and the site's personalized one, on the session's test images.

    With ``evaluation.membership_inference`` the site also attacks the global prompt with a
    loss-threshold membership inference, its training images as members and its test images as
    non-members; the per-record losses stay here and only the AUC is reported. A site without
    test images has no non-members, so it reports ``num_test=0`` and no attack.
    """
    features, labels = session.features("test")
    learner = session.learner(global_state)
    num_classes = len(session.data.classnames)
    metrics = evaluate(learner, features, labels, num_classes)
    personalized = None
    if personalization_for(session.cfg).personalized and len(session.data.test):
        own = personalized_learner(session, global_state, local_state)
        personalized = personalized_metrics(session, own, features, labels)
    attack_asked = session.cfg.evaluation.get("membership_inference", False)
    if not attack_asked or not len(session.data.test):
        return SiteEvaluation(metrics, personalized=personalized)
    members, member_labels = session.features("train")
    attack = membership_inference_auc(
        learner, members, member_labels, features, labels, seed=int(session.cfg.seed)
    )
    return SiteEvaluation(metrics, attack.auc, personalized)


def evaluate_round(
    cfg: DictConfig,
    site_index: int,
    global_state: Mapping[str, torch.Tensor | np.ndarray],
    local_state: Mapping[str, torch.Tensor] | None = None,
) -> SiteEvaluation:
    """Scores of the global prompt (and the site's own) on this site's own test images."""
    return evaluate_session(open_site(cfg, site_index), global_state, local_state)
