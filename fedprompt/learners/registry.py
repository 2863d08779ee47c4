"""Name-based registry of prompt learners, so that configs select a method by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fedprompt.backbones import Backbone
from fedprompt.learners.base import Learner

_LearnerT = TypeVar("_LearnerT", bound=type[Learner])
_LEARNERS: dict[str, type[Learner]] = {}


def register_learner(name: str) -> Callable[[_LearnerT], _LearnerT]:
    """Class decorator registering a ``Learner`` subclass under ``name`` (also set as ``cls.name``).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorate(cls: _LearnerT) -> _LearnerT:
        if name in _LEARNERS:
            raise ValueError(
                f"learner {name!r} is already registered (by {_LEARNERS[name].__qualname__})"
            )
        if not (isinstance(cls, type) and issubclass(cls, Learner)):
            raise TypeError(f"register_learner({name!r}) needs a Learner subclass, got {cls!r}")
        cls.name = name
        _LEARNERS[name] = cls
        return cls

    return decorate


def create_learner(
    name: str, backbone: Backbone, classnames: Sequence[str], **hparams: Any
) -> Learner:
    """Builds the learner registered as ``name``.

    Raises:
        ValueError: No learner of that name; the message lists the registered ones.
    """
    try:
        cls = _LEARNERS[name]
    except KeyError:
        raise ValueError(f"unknown learner {name!r}; registered: {list_learners()}") from None
    return cls(backbone, classnames, **hparams)


def learner_class(name: str) -> type[Learner]:
    """The class registered as ``name``.

    Raises:
        ValueError: No learner of that name.
    """
    if name not in _LEARNERS:
        raise ValueError(f"unknown learner {name!r}; registered: {list_learners()}")
    return _LEARNERS[name]


def list_learners() -> list[str]:
    """Names of the registered learners, sorted."""
    return sorted(_LEARNERS)
