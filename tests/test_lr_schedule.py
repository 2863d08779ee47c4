"""The learning-rate schedule spans the whole run: closed form, rounds, resume, FedProx, DP-SGD."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedprompt.learners import create_learner
from fedprompt.lr_schedule import LRSchedule, run_epoch
from fedprompt.privacy import SiteLedger, dp_train_local
from fedprompt.training import ProximalTerm, train_local

CLASSES = ["glioma", "meningioma", "pituitary", "normal"]
ROUNDS = 5
# 16 images in batches of 8: two steps an epoch, two epochs a round, ten epochs a run.
TRAIN = {
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 8,
    "local_epochs": 2,
    "lr_schedule": "cosine",
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
}

# Dassl's rate of run epoch e (E = 10 epochs, 1 warm-up): 1e-5, then
# 0.01 * (1 + cos(pi (e - 1) / 10)) / 2, worked out by hand:
# cos(0.3 pi) = 0.587785, cos(0.4 pi) = 0.309017, cos(0.8 pi) = -0.809017.
HAND = {0: 1e-5, 1: 0.01, 4: 0.0079389263, 5: 0.0065450850, 6: 0.005, 9: 0.0009549150}


@pytest.fixture()
def lrs_of_steps():
    """The rate of every optimizer step taken while the fixture is active, in order."""
    seen: list[float] = []

    def hook(optimizer, args, kwargs):
        seen.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(hook)
    yield seen
    handle.remove()


def _site(backbone, n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, backbone.embed_dim, generator=generator), dim=-1)
    return features, torch.arange(n) % len(CLASSES)


def test_closed_form_matches_hand_computed_values():
    schedule = LRSchedule.from_config(TRAIN, ROUNDS)
    assert schedule.total_epochs == 10
    for epoch, expected in HAND.items():
        assert schedule.rate(epoch) == pytest.approx(expected, rel=1e-7)


def test_constant_schedule_and_configs_without_the_keys_keep_train_lr():
    old_style = {"lr": 0.002, "local_epochs": 1}
    assert LRSchedule.from_config(old_style, 10).rate(0) == 0.002
    constant = LRSchedule.from_config(TRAIN | {"lr_schedule": "constant"}, ROUNDS)
    assert [constant.rate(e) for e in (0, 1, 9)] == [1e-5, 0.01, 0.01]
    with pytest.raises(ValueError, match=r"train\.lr_schedule"):
        LRSchedule.from_config(TRAIN | {"lr_schedule": "step"}, ROUNDS)


@pytest.mark.parametrize(("server_round", "epochs"), [(1, (0, 1)), (3, (4, 5)), (5, (8, 9))])
def test_each_step_of_a_round_gets_its_run_epoch_rate(
    miniature_backbone, lrs_of_steps, server_round, epochs
):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    train_local(
        learner, features, labels, TRAIN, seed=0, server_round=server_round, num_rounds=ROUNDS
    )
    assert [run_epoch(server_round, e, 2) for e in range(2)] == list(epochs)
    schedule = LRSchedule.from_config(TRAIN, ROUNDS)
    expected = [schedule.rate(epoch) for epoch in epochs for _ in range(2)]
    assert lrs_of_steps == pytest.approx(expected, rel=1e-12)
    for epoch in set(epochs) & set(HAND):
        assert schedule.rate(epoch) == pytest.approx(HAND[epoch], rel=1e-7)
    assert math.isclose(
        lrs_of_steps[-1], 0.5 * 0.01 * (1 + math.cos(math.pi * (epochs[-1] - 1) / 10))
    )


def test_round_three_of_a_resumed_run_equals_round_three_of_the_whole_run(
    miniature_backbone, lrs_of_steps
):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    for server_round in (1, 2):
        train_local(
            learner,
            features,
            labels,
            TRAIN,
            server_round,
            server_round=server_round,
            num_rounds=ROUNDS,
        )
    saved = {k: v.clone() for k, v in learner.trainable_state().items()}
    lrs_of_steps.clear()
    train_local(learner, features, labels, TRAIN, 3, server_round=3, num_rounds=ROUNDS)
    whole_run = (list(lrs_of_steps), learner.trainable_state()["ctx"].clone())

    resumed = create_learner("coop", miniature_backbone, CLASSES)  # a new process: no state
    resumed.load_trainable_state(saved)
    lrs_of_steps.clear()
    train_local(resumed, features, labels, TRAIN, 3, server_round=3, num_rounds=ROUNDS)
    assert lrs_of_steps == whole_run[0]
    assert torch.equal(resumed.trainable_state()["ctx"], whole_run[1])


def test_fedprox_keeps_the_schedule(miniature_backbone, lrs_of_steps):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    train_local(learner, features, labels, TRAIN, 0, server_round=3, num_rounds=ROUNDS)
    plain = list(lrs_of_steps)
    lrs_of_steps.clear()
    proximal = ProximalTerm(create_learner("coop", miniature_backbone, CLASSES), mu=0.1)
    train_local(proximal, features, labels, TRAIN, 0, server_round=3, num_rounds=ROUNDS)
    assert lrs_of_steps == plain


def test_dp_training_uses_the_same_rate_per_epoch(miniature_backbone, lrs_of_steps):
    features, labels = _site(miniature_backbone)
    ledger = SiteLedger.plan(
        target_epsilon=50.0,
        num_records=len(labels),
        batch_size=TRAIN["batch_size"],
        rounds=ROUNDS,
        local_epochs=TRAIN["local_epochs"],
        accountant="rdp",
        noise_multiplier=1.0,
    )
    privacy = {"max_grad_norm": 1.0, "clipping": "auto", "deterministic": True}
    learner = create_learner("coop", miniature_backbone, CLASSES)
    stats = dp_train_local(
        learner, features, labels, TRAIN, privacy, ledger, 0, server_round=3, num_rounds=ROUNDS
    )
    per_epoch = stats.steps // TRAIN["local_epochs"]
    assert per_epoch > 0
    schedule = LRSchedule.from_config(TRAIN, ROUNDS)
    expected = [schedule.rate(epoch) for epoch in (4, 5) for _ in range(per_epoch)]
    assert lrs_of_steps == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(HAND[4], rel=1e-7)


def _stepped_per_batch_by_torch(lr, warmup_lr, period, steps):
    """The rates of BiomedCoOp's CLIP-Adapter loop: one warm-up batch, then torch's
    CosineAnnealingLR(T_max=period) stepped after every batch (its recursive form, not ours)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=period)
    rates = [warmup_lr]
    for _ in range(steps - 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    return rates


BATCH = TRAIN | {"lr_step": "batch"}


def test_per_batch_steps_follow_torchs_cosine_beyond_its_period():
    schedule = LRSchedule.from_config(BATCH | {"local_epochs": 1}, 20)  # period 20 batches
    reference = _stepped_per_batch_by_torch(0.01, 1e-5, 20, 70)
    assert [schedule.rate(k) for k in range(70)] == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert schedule.rate(21) == pytest.approx(0.0, abs=1e-12)  # the rate reaches 0 ...
    assert schedule.rate(41) == pytest.approx(0.01)  # ... and rises back within the run
    with pytest.raises(ValueError, match=r"train\.lr_step"):
        LRSchedule.from_config(TRAIN | {"lr_step": "round"}, ROUNDS)


def test_per_batch_steps_are_counted_across_epochs_and_rounds(miniature_backbone, lrs_of_steps):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    train_local(learner, features, labels, BATCH, 0, server_round=3, num_rounds=ROUNDS)
    schedule = LRSchedule.from_config(BATCH, ROUNDS)
    # Round 3 holds run epochs 4 and 5, each of two batches: run steps 8 to 11.
    assert lrs_of_steps == pytest.approx([schedule.rate(k) for k in range(8, 12)], rel=1e-12)
    assert len(set(lrs_of_steps)) == 4  # a new rate every batch, not every epoch


def test_dp_training_steps_per_batch_too(miniature_backbone, lrs_of_steps):
    features, labels = _site(miniature_backbone)
    ledger = SiteLedger.plan(
        target_epsilon=50.0,
        num_records=len(labels),
        batch_size=BATCH["batch_size"],
        rounds=ROUNDS,
        local_epochs=BATCH["local_epochs"],
        accountant="rdp",
        noise_multiplier=1.0,
    )
    privacy = {"max_grad_norm": 1.0, "clipping": "auto", "deterministic": True}
    learner = create_learner("coop", miniature_backbone, CLASSES)
    stats = dp_train_local(
        learner, features, labels, BATCH, privacy, ledger, 0, server_round=2, num_rounds=ROUNDS
    )
    per_epoch = stats.steps // BATCH["local_epochs"]
    schedule = LRSchedule.from_config(BATCH, ROUNDS)
    first = 2 * per_epoch  # round 2 starts at run epoch 2
    expected = [schedule.rate(k) for k in range(first, first + stats.steps)]
    assert lrs_of_steps == pytest.approx(expected, rel=1e-12)
