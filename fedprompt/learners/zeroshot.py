"""Zero-shot: the frozen model with hand-written prompts, the baseline that needs no training."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner
from fedprompt.learners.frozen_text import check_templates, ensemble_features
from fedprompt.learners.registry import register_learner
from fedprompt.text.descriptions import find_bundled_set, load_descriptions


@register_learner("zeroshot")
class ZeroShot(Learner):
    """Classifies with an ensemble of hand-written prompts (CLIP, Radford et al., ICML 2021).

    Each class feature is the mean of the features of its templates (``"a photo of a {}."``) and,
    where available, its class descriptions. Nothing is trained: ``trainable_state()`` is empty,
    and a site neither trains nor needs training images.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        templates: Prompt templates, ``{}`` standing for the class name.
        use_descriptions: Add the class descriptions to the ensemble.
        descriptions: A bundled set's name or a JSON file; None picks the bundled set covering
            the classes, or uses the templates alone when there is none.
    """

    needs_training = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        templates: Sequence[str] = ("a photo of a {}.",),
        use_descriptions: bool = True,
        descriptions: str | None = None,
    ) -> None:
        super().__init__(backbone, classnames)
        check_templates(templates)
        sentences = [[t.format(name) for t in templates] for name in self.classnames]
        source = descriptions
        if use_descriptions and source is None:
            source = find_bundled_set(self.classnames)
        self.description_source = source if use_descriptions else None
        if self.description_source is not None:
            found = load_descriptions(self.classnames, self.description_source)
            sentences = [
                own + list(found[name]) for own, name in zip(sentences, found, strict=True)
            ]
        self._features = ensemble_features(backbone, sentences)

    def text_features(self) -> torch.Tensor:
        """The fixed, L2-normalised ensemble features (C, D)."""
        return self._features
