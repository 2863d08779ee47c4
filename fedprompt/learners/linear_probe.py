"""Linear probe: a linear classifier on the frozen image features (the CLIP paper's baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner
from fedprompt.learners.frozen_text import template_features
from fedprompt.learners.registry import register_learner

C_GRID: tuple[float, ...] = tuple(10.0**k for k in range(-6, 7))
"""Inverse regularisation strengths searched by ``solver="lbfgs"``: a log grid 1e-6..1e6, the
range CLIP's and CoOp's linear-probe protocols search over."""


@dataclass(frozen=True)
class ProbeFit:
    """What the L-BFGS probe chose: its C, that C's validation accuracy, and every C's."""

    c: float
    val_accuracy: float
    val_accuracies: dict[float, float]


def fit_logistic_regression(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float] = C_GRID,
    max_iter: int = 1000,
) -> tuple[np.ndarray, np.ndarray, ProbeFit]:
    """The papers' linear probe: scikit-learn's L-BFGS logistic regression, C chosen on val.

    One model is fitted per C; the C with the best validation accuracy wins (the smallest such C,
    the most regularised, on ties), as in CLIP's and CoOp's protocol.

    Returns:
        Weight (num_classes, D) and bias (num_classes,) of logits ``W x + b`` (a two-class fit's
        single decision row becomes ``[0; w]``, which ranks classes the same way), and the fit.

    Raises:
        ValueError: A class has no training image (its row could not be fitted).
    """
    from sklearn.linear_model import LogisticRegression

    missing = sorted(set(range(num_classes)) - set(np.unique(train_y).tolist()))
    if missing:
        raise ValueError(
            f"the L-BFGS linear probe needs training images of every class; class ids {missing} "
            "have none"
        )
    best: tuple[float, float, LogisticRegression] | None = None
    scores: dict[float, float] = {}
    for c in sorted(c_grid):
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
        model.fit(train_x, train_y)
        scores[c] = float((model.predict(val_x) == val_y).mean())
        if best is None or scores[c] > best[1]:
            best = (c, scores[c], model)
    assert best is not None
    c, accuracy, model = best
    weight, bias = model.coef_, model.intercept_
    if num_classes == 2:
        weight = np.concatenate([-weight / 2, weight / 2])
        bias = np.concatenate([-bias / 2, bias / 2])
    return weight, bias, ProbeFit(c=c, val_accuracy=accuracy, val_accuracies=scores)


@register_learner("linear_probe")
class LinearProbe(Learner):
    """Logits ``W x + b`` trained with cross-entropy; no text is involved after initialisation.

    CLIP (Radford et al., ICML 2021) and CoOp fit this model as an L2-regularised logistic
    regression with L-BFGS, C searched on the validation split (``solver="lbfgs"``, one
    centralized site); a federation trains it with the sites' SGD (``solver="sgd"``,
    ``train.weight_decay`` being the L2 term).

    Args:
        backbone: The shared frozen backbone.
        classnames: One name per class, in label order.
        init: ``"zeros"`` (plain logistic regression) or ``"zeroshot"``: W starts as the scaled
            hand-written prompt features, so the initial model is the zero-shot classifier.
        template: The prompt used by ``init="zeroshot"``, ``{}`` standing for the class name.
        solver: ``"sgd"``: trained by the training loop, federated or not. ``"lbfgs"``: fitted
            once per round by ``fit_lbfgs`` on the site's features, the papers' protocol; only
            for one site (``federation.num_sites=1``), since the fit needs all the images.
    """

    text_feature_only = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        init: str = "zeros",
        template: str = "a photo of a {}.",
        solver: str = "sgd",
    ) -> None:
        super().__init__(backbone, classnames)
        if solver not in ("sgd", "lbfgs"):
            raise ValueError(f"solver must be 'sgd' or 'lbfgs', got {solver!r}")
        self.solver = solver
        if init == "zeros":
            weight = torch.zeros(self.num_classes, backbone.embed_dim, device=backbone.device)
        elif init == "zeroshot":
            weight = self._logit_scale * template_features(backbone, self.classnames, [template])
        else:
            raise ValueError(f"init must be 'zeros' or 'zeroshot', got {init!r}")
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(torch.zeros(self.num_classes, device=backbone.device))

    def text_features(self) -> torch.Tensor:
        """The classifier's L2-normalised class directions (C, D)."""
        return F.normalize(self.weight, dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) = image_features @ W.T + b."""
        return F.linear(image_features.to(self.weight), self.weight, self.bias)

    def fit_lbfgs(
        self,
        train_features: torch.Tensor,
        train_labels: torch.Tensor,
        val_features: torch.Tensor,
        val_labels: torch.Tensor,
        c_grid: Sequence[float] = C_GRID,
    ) -> ProbeFit:
        """Sets W and b to the L-BFGS logistic regression whose C scores best on validation.

        Args:
            train_features: Frozen, L2-normalised training features (N, D).
            train_labels: Their class ids (N,).
            val_features: Validation features (M, D), for the choice of C.
            val_labels: Their class ids (M,).
            c_grid: The inverse regularisation strengths tried.
        """
        weight, bias, fit = fit_logistic_regression(
            train_features.detach().cpu().double().numpy(),
            train_labels.detach().cpu().numpy(),
            val_features.detach().cpu().double().numpy(),
            val_labels.detach().cpu().numpy(),
            self.num_classes,
            c_grid,
        )
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(weight))
            self.bias.copy_(torch.as_tensor(bias))
        return fit
