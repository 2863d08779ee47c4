"""Every site trains alone (``personalization=local_only``): the lower baseline of personalized FL.

Each site trains its own copy of the prompt, starting from the first global prompt it receives,
and keeps it in its node state and on its disk; it returns the global prompt it received
untouched, so the server's average never moves and no site's training leaves the site. It runs
through the same Flower apps and strategies as every other scheme.
"""

from __future__ import annotations

from fedprompt.personalization.base import Personalization


class LocalOnly(Personalization):
    """Sites train only their own prompt; the global one stays the initial prompt."""

    name = "local_only"
    trains_global = False
    personalized = True
