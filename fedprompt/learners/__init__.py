"""Prompt learners on a frozen backbone, selected by name through a registry."""

from fedprompt.learners import coop
from fedprompt.learners.base import Learner
from fedprompt.learners.registry import create_learner, list_learners, register_learner

__all__ = ["Learner", "coop", "create_learner", "list_learners", "register_learner"]
