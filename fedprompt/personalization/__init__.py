"""Personalization: which prompt tensors stay at a site, and how a site trains and scores them.

One module per scheme and one config per scheme (``configs/personalization/<name>.yaml``);
``personalization_from_config`` turns the validated section into a typed scheme.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedprompt.personalization.base import (
    LOCAL_PREFIX,
    LocalPrompt,
    NoPersonalization,
    Personalization,
    split_state,
)
from fedprompt.personalization.fedotp import FedOTP
from fedprompt.personalization.fedpgp import FedPGP
from fedprompt.personalization.finetune import FineTune
from fedprompt.personalization.local_only import LocalOnly
from fedprompt.personalization.promptfolio import PromptFolio

SCHEMES: dict[str, type[Personalization]] = {
    "none": NoPersonalization,
    "local_only": LocalOnly,
    "finetune": FineTune,
    "promptfolio": PromptFolio,
    "fedpgp": FedPGP,
    "fedotp": FedOTP,
}
"""Values of ``personalization.name``."""


def personalization_from_config(section: Mapping[str, Any] | None) -> Personalization:
    """The scheme a ``personalization`` section names, with its settings (none where absent).

    Raises:
        ValueError: An unknown scheme, or a setting the scheme does not have.
    """
    settings = dict(section or {"name": "none"})
    name = str(settings.pop("name", "none"))
    if name not in SCHEMES:
        raise ValueError(
            f"personalization={name} is not a scheme; choose one of {', '.join(SCHEMES)}."
        )
    try:
        return SCHEMES[name](**settings)
    except TypeError as err:
        raise ValueError(f"personalization={name} got settings it does not have: {err}") from err


__all__ = [
    "LOCAL_PREFIX",
    "SCHEMES",
    "LocalPrompt",
    "Personalization",
    "personalization_from_config",
    "split_state",
]
