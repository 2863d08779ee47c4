"""Sample-level differential privacy for prompt learning: DP-SGD, accounting, budget ledgers."""

from fedprompt.privacy.calibration import (
    ACCOUNTANTS,
    default_delta,
    epsilon_for,
    noise_multiplier_for,
    planned_steps,
    sample_rate,
    steps_per_epoch,
)
from fedprompt.privacy.dp_training import DPTrainStats, dp_train_local, privacy_summary
from fedprompt.privacy.ledger import SiteLedger, load_or_plan_ledger, planned_budget
from fedprompt.privacy.loss_split import (
    CLIPPING_MODES,
    private_loss,
    private_sample_losses,
    public_loss,
    resolve_clipping,
)
from fedprompt.privacy.per_sample_gradients import ExactClipping, per_sample_gradients
from fedprompt.privacy.text_feature_clipping import TextFeatureClipping

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_MODES",
    "DPTrainStats",
    "ExactClipping",
    "SiteLedger",
    "TextFeatureClipping",
    "default_delta",
    "dp_train_local",
    "epsilon_for",
    "load_or_plan_ledger",
    "noise_multiplier_for",
    "per_sample_gradients",
    "planned_budget",
    "planned_steps",
    "privacy_summary",
    "private_loss",
    "private_sample_losses",
    "public_loss",
    "resolve_clipping",
    "sample_rate",
    "steps_per_epoch",
]
