"""ProGrad (Zhu et al., ICCV 2023): CoOp whose update never opposes the zero-shot prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.coop import CoOp
from fedprompt.learners.frozen_text import template_features
from fedprompt.learners.registry import register_learner


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ProGrad's general-knowledge loss: T^2 * cross-entropy of softmax(teacher/T) and student/T.

    It differs from KL(teacher || student) by the teacher's entropy, a constant, so the gradient
    is the KL's.
    """
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return -(teacher * log_student).sum(dim=-1).mean() * temperature**2


def project_gradient(
    task_grad: torch.Tensor, general_grad: torch.Tensor, strength: float
) -> torch.Tensor:
    """ProGrad's rule for one tensor: drop the task gradient's part that opposes the general one.

    With g the cross-entropy gradient and G the distillation gradient, keep g when g . G >= 0,
    else use g - strength * (g . G / |G|^2) G.
    """
    norm = general_grad.norm()
    if norm == 0:
        return task_grad
    unit = general_grad / norm
    dot = (task_grad * unit).sum()
    return task_grad - strength * dot * unit if dot < 0 else task_grad


@register_learner("prograd")
class ProGrad(CoOp):
    """CoOp updated along the cross-entropy gradient, projected off its conflict with zero-shot.

    ``loss`` returns the cross-entropy's value, but a tensor whose gradient is the projected
    gradient (two backward passes through the text tower inside ``loss``), so an ordinary
    ``loss.backward(); optimizer.step()`` loop applies ProGrad's update. The projection uses the
    batch's summed gradients, so the loss is not a sum of per-sample terms; DP-SGD projects each
    image's own gradient instead, then clips it.

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        temperature: Distillation temperature T (the paper's 1.0).
        strength: Projection strength lambda (the paper's 1.0).
        template: The hand-written zero-shot prompt, ``{}`` standing for the class name.
        **context: CoOp's context settings: n_ctx, ctx_init, class_specific, trim_padding.
    """

    text_feature_only = False
    per_sample_loss = False
    record_loss_note = "the projection is applied to each image's gradient, not the batch's"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        temperature: float = 1.0,
        strength: float = 1.0,
        template: str = "a photo of a {}.",
        **context: Any,
    ) -> None:
        super().__init__(backbone, classnames, **context)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.strength = strength
        self.zeroshot_features = template_features(backbone, self.classnames, [template])

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy's value, carrying ProGrad's projected gradient (plain CE under no_grad)."""
        self.check_extras(extras)
        logits = self(image_features)
        ce = F.cross_entropy(logits, labels.to(logits.device))
        if not torch.is_grad_enabled():
            return ce
        teacher = self._logit_scale * image_features.to(logits) @ self.zeroshot_features.t()
        kd = distillation_loss(logits, teacher, self.temperature)
        params = [p for p in self.parameters() if p.requires_grad]
        task = torch.autograd.grad(ce, params, retain_graph=True)
        general = torch.autograd.grad(kd, params)
        surrogate = sum(
            (p * project_gradient(g, h, self.strength)).sum()
            for p, g, h in zip(params, task, general, strict=True)
        )
        return ce.detach() + surrogate - surrogate.detach()
