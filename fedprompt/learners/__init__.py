"""Prompt learners on a frozen backbone, selected by name through a registry.

Each method module registers its learner on import; the imports below register them all.
"""

from fedprompt.learners import (
    biomedcoop,
    biovlm,
    clip_adapter,
    cocoop,
    coop,
    kgcoop,
    linear_probe,
    ogkd,
    prograd,
    vmfcoop,
    zeroshot,
)
from fedprompt.learners.base import Learner
from fedprompt.learners.registry import create_learner, list_learners, register_learner

__all__ = [
    "Learner",
    "biomedcoop",
    "biovlm",
    "clip_adapter",
    "cocoop",
    "coop",
    "create_learner",
    "kgcoop",
    "linear_probe",
    "list_learners",
    "ogkd",
    "prograd",
    "register_learner",
    "vmfcoop",
    "zeroshot",
]
