"""Every registered learner trains a DP-SGD round; public terms stay out of the private part."""

import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import create_learner, list_learners
from fedprompt.privacy import SiteLedger, dp_train_local, resolve_clipping

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
RECORDS, VIEWS = 8, 2


@pytest.mark.parametrize("name", list_learners())
def test_learner_trains_privately_or_is_refused(miniature_backbone, name):
    learner = create_learner(name, miniature_backbone, CLASSES)
    if not learner.needs_training:
        pytest.skip(f"{name} has nothing to train")
    generator = torch.Generator().manual_seed(0)
    dim = miniature_backbone.embed_dim
    features = F.normalize(torch.randn(RECORDS, VIEWS, dim, generator=generator), dim=-1)
    labels = torch.randint(len(CLASSES), (RECORDS,), generator=generator)
    tokens = [torch.randn(RECORDS, 5, dim, generator=generator) for _ in range(VIEWS)]
    ledger = SiteLedger.plan(
        target_epsilon=50.0,
        num_records=RECORDS,
        batch_size=4,
        rounds=1,
        local_epochs=1,
        accountant="rdp",
        noise_multiplier=1.0,
    )
    train = {"lr": 0.01, "local_epochs": 1, "batch_size": 4}
    privacy = {"clipping": "auto", "deterministic": True}
    patch_tokens = tokens if "patch_tokens" in learner.required_inputs else None
    if not learner.per_sample_loss:
        assert learner.record_loss_note, f"{name} couples the batch but says nothing for DP"
    before = learner.trainable_state()
    stats = dp_train_local(
        learner, features, labels, train, privacy, ledger, 0, patch_tokens=patch_tokens
    )
    assert stats.clipping == resolve_clipping(learner, "auto")
    assert stats.steps == 2 and ledger.steps == 2
    assert torch.isfinite(torch.tensor(stats.loss))
    after = learner.trainable_state()
    assert any(not torch.equal(before[key], after[key]) for key in before)
    assert all(torch.isfinite(value).all() for value in after.values())


@pytest.mark.parametrize("name", ["biomedcoop", "ogkd", "vmfcoop"])
def test_private_and_public_parts_add_up_to_the_loss(miniature_backbone, name):
    learner = create_learner(name, miniature_backbone, CLASSES)
    learner.eval()  # vMFCoOp's temperature schedule stays put
    generator = torch.Generator().manual_seed(1)
    dim = miniature_backbone.embed_dim
    features = F.normalize(torch.randn(RECORDS, dim, generator=generator), dim=-1)
    labels = torch.randint(len(CLASSES), (RECORDS,), generator=generator)
    extras = {}
    if "patch_tokens" in learner.required_inputs:
        extras["patch_tokens"] = torch.randn(RECORDS, 5, dim, generator=generator)
    whole = learner.loss(features, labels, **extras)
    parts = learner.private_loss(features, labels, **extras) + learner.public_loss()
    assert torch.allclose(whole, parts, atol=1e-5)
    other = F.normalize(torch.randn(RECORDS, dim, generator=generator), dim=-1)
    assert not torch.allclose(
        learner.private_loss(features, labels, **extras),
        learner.private_loss(other, labels, **extras),
    )
