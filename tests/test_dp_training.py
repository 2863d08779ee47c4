"""DP local training: the ledger counts steps, the budget stops a site, public terms skip noise."""

import copy
import importlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import create_learner
from fedprompt.learners.coop import CoOp
from fedprompt.privacy import (
    DPTrainStats,
    SiteLedger,
    dp_train_local,
    privacy_summary,
    resolve_clipping,
)
from fedprompt.privacy.dp_training import _generators

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
TRAIN = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "local_epochs": 1, "batch_size": 6}
PRIVACY = {"max_grad_norm": 1.0, "clipping": "auto", "deterministic": True}


def _site(backbone, n=24, views=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, views, backbone.embed_dim, generator=generator), dim=-1)
    labels = torch.randint(len(CLASSES), (n,), generator=generator)
    return (features[:, 0] if views == 1 else features), labels


def _ledger(n=24, noise=1.0, epsilon=50.0, batch_size=TRAIN["batch_size"], rounds=2, epochs=1):
    return SiteLedger.plan(
        target_epsilon=epsilon,
        num_records=n,
        batch_size=batch_size,
        rounds=rounds,
        local_epochs=epochs,
        accountant="rdp",
        noise_multiplier=noise,
    )


def _spy_on(monkeypatch, clipper, setting):
    """The value of ``setting`` each ``clipper`` that ``dp_train_local`` builds is given."""
    module = importlib.import_module("fedprompt.privacy.dp_training")
    seen = []
    real = getattr(module, clipper)

    def spy(learner, **settings):
        seen.append(settings[setting])
        return real(learner, **settings)

    monkeypatch.setattr(module, clipper, spy)
    return seen


class AnchoredCoOp(CoOp):
    """CoOp plus a public term pulling T toward fixed anchors (as SCCM does with descriptions)."""

    def __init__(self, backbone, classnames, weight=1.0):
        super().__init__(backbone, classnames)
        generator = torch.Generator().manual_seed(7)
        self.anchors = F.normalize(
            torch.randn(len(classnames), backbone.embed_dim, generator=generator), dim=-1
        )
        self.weight = weight

    def public_loss(self):
        return self.weight * (self.text_features() - self.anchors).square().sum()

    def private_sample_losses(self, similarities, labels, image_features):
        return F.cross_entropy(self._logit_scale * similarities, labels, reduction="none")

    def private_loss(self, image_features, labels):
        return super().loss(image_features, labels)

    def loss(self, image_features, labels):
        return self.private_loss(image_features, labels) + self.public_loss()


class ImageConditioned(CoOp):
    """Image-conditioned toy: a per-image shift of the text features (not text-feature-only)."""

    text_feature_only = False

    def __init__(self, backbone, classnames):
        super().__init__(backbone, classnames)
        self.shift = torch.nn.Linear(backbone.embed_dim, backbone.embed_dim, bias=False)

    def forward(self, image_features):
        text = self.text_features()
        shifted = F.normalize(text[None] + self.shift(image_features)[:, None], dim=-1)
        return self._logit_scale * torch.einsum("bd,bcd->bc", image_features, shifted)


def test_rounds_spend_the_ledger_until_the_budget_stops_the_site(miniature_backbone):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    ledger = _ledger()
    assert ledger.steps_per_round(1) == 4
    ledger.target_epsilon = ledger.epsilon(extra_steps=8)  # two rounds fit, a third does not
    epsilons = []
    for round_number in range(3):
        ledger = SiteLedger.from_dict(ledger.to_dict())  # as kept in the node's state
        before = copy.deepcopy(learner.trainable_state())
        stats = dp_train_local(learner, features, labels, TRAIN, PRIVACY, ledger, seed=round_number)
        changed = not torch.equal(before["ctx"], learner.ctx.detach())
        if round_number < 2:
            assert not stats.budget_exhausted and stats.steps == 4 and changed
            assert stats.total_steps == 4 * (round_number + 1)
            assert stats.clipping == "text_features"
        else:
            assert stats.budget_exhausted and stats.steps == 0 and not changed
        epsilons.append(stats.epsilon)
        metrics = stats.metrics()
        assert metrics["dp-epsilon"] == stats.epsilon
        assert all(isinstance(value, (int, float)) for value in metrics.values())
    assert 0 < epsilons[0] < epsilons[1] == epsilons[2] == ledger.target_epsilon
    assert ledger.epsilon() == epsilons[1]
    assert ledger.summary()["steps"] == 8
    assert privacy_summary(metrics, "rdp") == ledger.summary()


def test_deterministic_runs_repeat_and_entropy_runs_differ(miniature_backbone):
    features, labels = _site(miniature_backbone, views=2)
    states = []
    for deterministic in (True, True, False):
        learner = create_learner("coop", miniature_backbone, CLASSES)
        privacy = {**PRIVACY, "deterministic": deterministic}
        dp_train_local(learner, features, labels, TRAIN, privacy, _ledger(), seed=3)
        states.append(learner.ctx.detach().clone())
    assert torch.equal(states[0], states[1])
    assert not torch.equal(states[0], states[2])


@pytest.mark.parametrize("clipping", ["text_features", "exact"])
def test_public_terms_are_neither_clipped_nor_noised(miniature_backbone, clipping):
    features, labels = _site(miniature_backbone, n=12)
    learner = AnchoredCoOp(miniature_backbone, CLASSES)
    reference = copy.deepcopy(learner)
    # A vanishing clipping norm leaves only the public term's gradient (noise std is 1e-12).
    privacy = {**PRIVACY, "max_grad_norm": 1e-12, "clipping": clipping}
    stats = dp_train_local(learner, features, labels, TRAIN, privacy, _ledger(n=12), seed=0)
    assert stats.clipping == clipping and stats.steps == 2
    optimizer = torch.optim.SGD([reference.ctx], lr=TRAIN["lr"])
    for _ in range(stats.steps):
        optimizer.zero_grad()
        reference.public_loss().backward()
        optimizer.step()
    torch.testing.assert_close(learner.ctx, reference.ctx, rtol=1e-5, atol=1e-6)
    assert not torch.equal(learner.ctx, AnchoredCoOp(miniature_backbone, CLASSES).ctx)


def test_image_conditioned_learner_trains_in_exact_mode(miniature_backbone):
    features, labels = _site(miniature_backbone, n=12)
    learner = ImageConditioned(miniature_backbone, CLASSES)
    shift_before = learner.shift.weight.detach().clone()
    stats = dp_train_local(learner, features, labels, TRAIN, PRIVACY, _ledger(n=12), seed=0)
    assert stats.clipping == "exact" and stats.steps == 2
    assert not torch.equal(shift_before, learner.shift.weight)
    with pytest.raises(ValueError, match="exact"):
        dp_train_local(
            learner,
            features,
            labels,
            TRAIN,
            {**PRIVACY, "clipping": "text_features"},
            _ledger(n=12),
            seed=0,
        )


def test_refuses_a_ledger_for_another_site_and_non_per_sample_losses(miniature_backbone):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    with pytest.raises(ValueError, match="planned for 30"):
        dp_train_local(learner, features, labels, TRAIN, PRIVACY, _ledger(n=30), seed=0)

    class Contrastive(CoOp):
        per_sample_loss = False

    with pytest.raises(ValueError, match="per-record"):
        dp_train_local(
            Contrastive(miniature_backbone, CLASSES), features, labels, TRAIN, PRIVACY, _ledger(), 0
        )


class BatchCentred(CoOp):
    """A loss that couples the batch (logits centred over it), taken one record at a time."""

    per_sample_loss = False
    record_loss_note = "the logits are centred over the record itself"

    def loss(self, image_features, labels):
        logits = self(image_features)
        centred = logits - logits.mean(dim=0, keepdim=True).detach()
        return F.cross_entropy(centred, labels)


def test_a_batch_coupled_loss_trains_one_record_at_a_time_in_exact_mode(miniature_backbone, caplog):
    learner = BatchCentred(miniature_backbone, CLASSES)
    assert resolve_clipping(learner, "auto") == "exact"
    with pytest.raises(ValueError, match="clipping=exact"):
        resolve_clipping(learner, "text_features")
    features, labels = _site(miniature_backbone)
    before = learner.trainable_state()
    with caplog.at_level("INFO", logger="fedprompt.privacy.dp_training"):
        stats = dp_train_local(learner, features, labels, TRAIN, PRIVACY, _ledger(), seed=0)
    assert [record.getMessage() for record in caplog.records] == [
        "BatchCentred under DP-SGD, one record at a time: the logits are centred over the record "
        "itself."
    ]
    assert stats.clipping == "exact" and stats.steps > 0
    assert not torch.equal(before["ctx"], learner.trainable_state()["ctx"])


def test_metrics_hold_every_privacy_scalar_and_no_string():
    stats = DPTrainStats(
        loss=0.5,
        num_examples=24,
        steps=4,
        seconds=1.0,
        epsilon=2.5,
        delta=1e-5,
        noise_multiplier=1.1,
        sample_rate=0.25,
        total_steps=8,
        clipping="exact",
        budget_exhausted=True,
    )
    metrics = stats.metrics()
    assert metrics == {
        "dp-epsilon": 2.5,
        "dp-delta": 1e-5,
        "dp-noise-multiplier": 1.1,
        "dp-sample-rate": 0.25,
        "dp-steps": 8,
        "dp-budget-exhausted": 1,
    }
    assert type(metrics["dp-budget-exhausted"]) is int
    assert replace(stats, budget_exhausted=False).metrics()["dp-budget-exhausted"] == 0


def test_privacy_summary_is_typed_from_the_reported_scalars():
    reported = {
        "dp-epsilon": 3,
        "dp-delta": 1e-5,
        "dp-noise-multiplier": 2,
        "dp-sample-rate": 0.5,
        "dp-steps": 12.0,
        "dp-budget-exhausted": 0,
    }
    summary = privacy_summary(reported, "prv")
    assert summary == {
        "epsilon": 3.0,
        "delta": 1e-5,
        "noise_multiplier": 2.0,
        "sample_rate": 0.5,
        "steps": 12,
        "accountant": "prv",
    }
    assert [type(value) for value in summary.values()] == [float, float, float, float, int, str]


def _draws(generators):
    sampling, noise = generators
    return torch.rand(4, generator=sampling), torch.rand(4, generator=noise)


def test_deterministic_generators_follow_the_seed_and_entropy_ones_do_not():
    cpu = torch.device("cpu")
    sampling, noise = _draws(_generators(5, True, cpu))
    again = _draws(_generators(5, True, cpu))
    assert torch.equal(sampling, again[0]) and torch.equal(noise, again[1])
    assert not torch.equal(sampling, noise)  # two streams, not one drawn twice
    other = _draws(_generators(6, True, cpu))
    assert not torch.equal(sampling, other[0]) and not torch.equal(noise, other[1])
    # Neither stream is the seed's own torch stream, which the view choice draws from.
    assert not torch.equal(sampling, torch.rand(4, generator=torch.Generator().manual_seed(5)))
    first, second = _draws(_generators(5, False, cpu)), _draws(_generators(5, False, cpu))
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])


def test_a_ledger_for_another_site_is_refused_in_one_sentence(miniature_backbone):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    with pytest.raises(ValueError) as error:
        dp_train_local(learner, features, labels, TRAIN, PRIVACY, _ledger(n=30), seed=0)
    assert str(error.value) == (
        "The site holds 24 training records but its privacy ledger was planned for 30; the "
        "sampling rate and epsilon would be wrong."
    )


def test_a_learner_with_nothing_to_train_is_refused(miniature_backbone):
    features, labels = _site(miniature_backbone)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    learner.ctx.requires_grad_(False)
    with pytest.raises(ValueError) as error:
        dp_train_local(learner, features, labels, TRAIN, PRIVACY, _ledger(), seed=0)
    assert str(error.value) == "CoOp has nothing to train; skip its local training."


class PatchReader(CoOp):
    required_inputs = ("patch_tokens",)


def test_missing_patch_tokens_are_refused_before_any_step(miniature_backbone):
    features, labels = _site(miniature_backbone)
    ledger = _ledger()
    with pytest.raises(ValueError) as error:
        dp_train_local(
            PatchReader(miniature_backbone, CLASSES), features, labels, TRAIN, PRIVACY, ledger, 0
        )
    assert str(error.value) == "PatchReader needs patch tokens but none were cached for this site."
    assert ledger.steps == 0


def test_a_non_finite_private_loss_stops_training_in_one_sentence(miniature_backbone):
    features, labels = _site(miniature_backbone, n=12)
    features[:] = float("nan")
    learner = create_learner("coop", miniature_backbone, CLASSES)
    ledger = _ledger(n=12)
    ledger.spend(4)  # an earlier round's steps: the sentence counts this round's
    with pytest.raises(FloatingPointError) as error:
        dp_train_local(learner, features, labels, TRAIN, PRIVACY, ledger, seed=0)
    assert str(error.value) == "The private training loss became nan at step 1; lower train.lr."


def test_privacy_defaults_are_auto_clipping_norm_one_and_fresh_entropy(miniature_backbone):
    features, labels = _site(miniature_backbone, n=12)

    def trained(privacy, seed=0):
        learner = create_learner("coop", miniature_backbone, CLASSES)
        stats = dp_train_local(learner, features, labels, TRAIN, privacy, _ledger(n=12), seed)
        return stats, learner.ctx.detach().clone()

    stats, implicit = trained({"deterministic": True})
    _, explicit = trained({"deterministic": True, "clipping": "auto", "max_grad_norm": 1.0})
    assert stats.clipping == "text_features" and torch.equal(implicit, explicit)
    # Unless asked to be deterministic, the same seed gives other draws (noise and sampling).
    assert not torch.equal(trained({})[1], trained({})[1])


def test_the_reported_loss_is_the_mean_private_loss_and_time_is_wall_clock(miniature_backbone):
    features, labels = _site(miniature_backbone, n=8)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    want = learner.loss(features, labels).item()
    # Rate 1: every record is in the epoch's one batch; lr 0 leaves the prompt as it was.
    ledger = SiteLedger.plan(
        target_epsilon=1e6,
        num_records=8,
        batch_size=8,
        rounds=1,
        local_epochs=1,
        accountant="rdp",
        noise_multiplier=1.0,
    )
    stats = dp_train_local(learner, features, labels, {**TRAIN, "lr": 0.0}, PRIVACY, ledger, 0)
    assert stats.steps == 1 and stats.num_examples == 8
    assert stats.loss == pytest.approx(want, rel=1e-5)
    assert 0 < stats.seconds < 600
    spent = dp_train_local(learner, features, labels, TRAIN, PRIVACY, _ledger(8, epsilon=1e-3), 0)
    assert spent.budget_exhausted and spent.loss == 0.0 and spent.steps == 0


def test_a_call_without_its_round_trains_as_round_one_of_one(miniature_backbone):
    features, labels = _site(miniature_backbone, n=12)
    train = {**TRAIN, "local_epochs": 2, "lr_schedule": "cosine"}

    def trained(**round_args):
        learner = create_learner("coop", miniature_backbone, CLASSES)
        ledger = _ledger(n=12)
        dp_train_local(learner, features, labels, train, PRIVACY, ledger, seed=0, **round_args)
        return learner.ctx.detach().clone()

    implicit = trained()
    assert torch.equal(implicit, trained(server_round=1, num_rounds=1))
    assert not torch.equal(implicit, trained(server_round=1, num_rounds=2))  # a slower cosine
    assert not torch.equal(implicit, trained(server_round=2, num_rounds=2))


@pytest.mark.parametrize(("n", "batch_size"), [(24, 6), (12, 1)])
def test_the_noisy_sum_is_divided_by_the_expected_batch_size(
    miniature_backbone, monkeypatch, n, batch_size
):
    """q * n, as Opacus plans it: the batch size the ledger was planned with."""
    seen = _spy_on(monkeypatch, "TextFeatureClipping", "expected_batch_size")
    features, labels = _site(miniature_backbone, n=n)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    ledger = _ledger(n, epsilon=1e4, batch_size=batch_size, rounds=1)
    dp_train_local(learner, features, labels, TRAIN, PRIVACY, ledger, seed=0)
    assert seen == [batch_size]


@pytest.mark.parametrize("chunk", [None, 3])
def test_the_exact_chunk_size_reaches_the_exact_clipper(miniature_backbone, monkeypatch, chunk):
    seen = _spy_on(monkeypatch, "ExactClipping", "chunk_size")
    features, labels = _site(miniature_backbone, n=12)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    privacy = {**PRIVACY, "clipping": "exact", "exact_chunk_size": chunk}
    dp_train_local(learner, features, labels, TRAIN, privacy, _ledger(n=12), seed=0)
    assert seen == [chunk]


def test_an_empty_poisson_batch_is_a_step_like_any_other(miniature_backbone, monkeypatch):
    """At q = 0.1 a batch is empty with probability 0.9 ** 10: a noised, accounted step."""
    sizes = []
    module = importlib.import_module("fedprompt.privacy.dp_training")
    real = module.TextFeatureClipping

    class Counting(real):
        def private_gradient(self, image_features, labels, extras):
            sizes.append(len(labels))
            return super().private_gradient(image_features, labels, extras)

    monkeypatch.setattr(module, "TextFeatureClipping", Counting)
    features, labels = _site(miniature_backbone, n=10)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    ledger = _ledger(10, epsilon=1e4, batch_size=1, rounds=1)
    stats = dp_train_local(learner, features, labels, TRAIN, PRIVACY, ledger, seed=0)
    assert stats.steps == 10 == len(sizes) and ledger.steps == 10
    assert 0 in sizes  # this seed draws an empty batch


def test_patch_tokens_go_only_to_a_learner_that_reads_them(miniature_backbone):
    features, labels = _site(miniature_backbone, n=12)
    tokens = [torch.randn(12, 5, 8, generator=torch.Generator().manual_seed(3))]

    privacy = {**PRIVACY, "clipping": "exact"}  # the exact loss takes every extra it is given

    def trained(**extra):
        learner = create_learner("coop", miniature_backbone, CLASSES)
        dp_train_local(learner, features, labels, TRAIN, privacy, _ledger(n=12), 0, **extra)
        return learner.ctx.detach().clone()

    assert torch.equal(trained(patch_tokens=tokens), trained())


@pytest.mark.parametrize(("n", "batch_size", "epochs"), [(8, 4, 2), (1, 1, 1)])
def test_the_reported_loss_is_the_mean_over_every_sampled_record(
    miniature_backbone, n, batch_size, epochs
):
    """Every record the same: whatever the Poisson batches hold, the mean is one record's loss."""
    features, labels = _site(miniature_backbone, n=1)
    features, labels = features.expand(n, -1).clone(), labels.expand(n).clone()
    learner = create_learner("coop", miniature_backbone, CLASSES)
    want = learner.loss(features[:1], labels[:1]).item()
    ledger = _ledger(n, epsilon=1e6, batch_size=batch_size, rounds=1, epochs=epochs)
    train = {**TRAIN, "lr": 0.0, "local_epochs": epochs}
    stats = dp_train_local(learner, features, labels, train, PRIVACY, ledger, seed=1)
    assert stats.loss == pytest.approx(want, rel=1e-5)
    assert stats.num_examples > batch_size or n == 1  # several batches held records


def test_steps_the_ledger_did_not_record_stop_the_round_in_one_sentence(miniature_backbone):
    features, labels = _site(miniature_backbone, n=12)
    learner = create_learner("coop", miniature_backbone, CLASSES)
    ledger = _ledger(n=12)
    ledger.optimizer_hook = lambda: (lambda optimizer: None)  # an accountant that lost count
    with pytest.raises(RuntimeError) as error:
        dp_train_local(learner, features, labels, TRAIN, PRIVACY, ledger, seed=0)
    assert str(error.value) == (
        "The privacy ledger recorded 0 noisy steps this round but 2 were taken; the reported "
        "epsilon would be wrong."
    )
