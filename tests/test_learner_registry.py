"""The learner registry: methods are created by name and names are unique."""

import pytest
import torch
import torch.nn.functional as F

from fedprompt.learners import Learner, create_learner, list_learners, register_learner
from fedprompt.learners import registry as registry_module
from fedprompt.learners.coop import CoOp

CLASSES = ["benign", "malignant"]


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_LEARNERS", dict(registry_module._LEARNERS))


def test_coop_is_registered(miniature_backbone):
    assert "coop" in list_learners()
    learner = create_learner("coop", miniature_backbone, CLASSES, n_ctx=2, ctx_init=None)
    assert isinstance(learner, CoOp) and learner.name == "coop"
    assert learner.ctx.shape == (2, learner.prompt_encoder.width)


def test_unknown_learner_lists_the_known_ones(miniature_backbone):
    with pytest.raises(ValueError, match=r"unknown learner 'maple'.*coop"):
        create_learner("maple", miniature_backbone, CLASSES)


def test_unknown_hyperparameter_is_an_error(miniature_backbone):
    with pytest.raises(TypeError, match="n_context"):
        create_learner("coop", miniature_backbone, CLASSES, n_context=4)


def test_duplicate_name_is_rejected(isolated_registry):
    with pytest.raises(ValueError, match="already registered"):

        @register_learner("coop")
        class Another(CoOp):
            pass


def test_registering_a_new_learner(isolated_registry, miniature_backbone):
    @register_learner("fixed-prompt")
    class FixedPrompt(Learner):
        def __init__(self, backbone, classnames, *, template="a photo of a {}."):
            super().__init__(backbone, classnames)
            tokens = backbone.tokenizer([template.format(name) for name in classnames])
            self.register_buffer("features", backbone.encode_text(tokens))
            self.bias = torch.nn.Parameter(torch.zeros(len(classnames)))

        def text_features(self):
            return F.normalize(self.features, dim=-1)

    assert "fixed-prompt" in list_learners() and FixedPrompt.name == "fixed-prompt"
    learner = create_learner("fixed-prompt", miniature_backbone, CLASSES, template="{}")
    assert isinstance(learner, FixedPrompt)
    assert set(learner.trainable_state()) == {"bias"}
    assert learner.num_trainable() == 2
    images = F.normalize(torch.randn(3, miniature_backbone.embed_dim), dim=-1)
    assert learner(images).shape == (3, 2)


def test_only_learners_can_be_registered(isolated_registry):
    with pytest.raises(TypeError, match="Learner subclass"):
        register_learner("not-a-learner")(dict)
