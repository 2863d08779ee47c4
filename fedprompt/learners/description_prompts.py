"""CoOp plus the public descriptions of its classes: the set-up BiomedCoOp, OGKD, vMFCoOp share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedprompt.backbones import Backbone
from fedprompt.learners.coop import CoOp
from fedprompt.learners.distillation import DescriptionTeacher, sccm_loss
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


class DescriptionTeacherCoOp(DescriptionGuidedCoOp):
    """BiomedCoOp's and OGKD's common part: the filtered description teacher, and SCCM.

    SCCM pulls each learned class feature towards its descriptions' mean feature; it reads no
    image, so it is the public term (``public_loss``) that DP-SGD neither clips nor noises. The
    teacher's prompt-set filter is computed over the batch, so the loss couples the batch's
    records, and DP-SGD takes the private terms one image at a time.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        sccm_weight: Weight of SCCM (BTMRI few-shot: 0.5).
        tau: Outlier threshold of the teacher's prompt-set filter (BTMRI few-shot: 1.5).
        **context: ``DescriptionGuidedCoOp``'s settings: descriptions, and CoOp's context
            settings n_ctx, ctx_init, class_specific, trim_padding.
    """

    per_sample_loss = False
    record_loss_note = "the teacher's prompt-set filter is computed per image, not per batch"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        sccm_weight: float = 0.5,
        tau: float = 1.5,
        **context: Any,
    ) -> None:
        super().__init__(backbone, classnames, **context)
        self.sccm_weight = sccm_weight
        self.teacher = DescriptionTeacher(backbone, self.classnames, self.class_descriptions, tau)

    def sccm(self, text: torch.Tensor) -> torch.Tensor:
        """The weighted SCCM term for class features ``text`` (C, D)."""
        return self.sccm_weight * sccm_loss(text, self.teacher.means)

    def public_loss(self) -> torch.Tensor:
        """SCCM: the class features against the public descriptions' mean features."""
        return self.sccm(self.text_features())
