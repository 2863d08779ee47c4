"""CoOp plus the public descriptions of its classes: the set-up BiomedCoOp, OGKD, vMFCoOp share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedprompt.backbones import Backbone
from fedprompt.learners.coop import CoOp
from fedprompt.text.descriptions import load_descriptions


class DescriptionGuidedCoOp(CoOp):
    """CoOp whose loss also draws on sentences describing each class (not registered itself).

    The descriptions are public text, so the terms built from them use no private data. They are
    loaded here once, for the subclass's loss to turn into targets or a teacher.

    Attributes:
        class_descriptions: The sentences of each class, in label order.
        description_source: The bundled set's name or the file the sentences came from.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        descriptions: A bundled set's name or a JSON file; None picks the bundled set covering
            the classes.
        **context: CoOp's context settings: n_ctx, ctx_init, class_specific, trim_padding.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        descriptions: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(backbone, classnames, **context)
        self.class_descriptions = load_descriptions(self.classnames, descriptions)
        self.description_source = self.class_descriptions.source
