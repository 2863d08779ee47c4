"""The federated prompt, then a few local epochs at each site before it scores (``finetune``).

The usual FedAvg+FT baseline (PromptFL+FT in PromptFolio's comparison): training is plain
federation; at evaluation each site fine-tunes a copy of the global prompt on its own training
images for ``personalization.local_epochs`` epochs and scores that copy on its test images. The
copy is rebuilt from the global prompt every round, so nothing needs to be kept between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedprompt.personalization.base import Personalization


@dataclass(frozen=True)
class FineTune(Personalization):
    """Local fine-tuning of the global prompt before each site's personalized score.

    Attributes:
        local_epochs: Epochs of fine-tuning on the site's own training images.
    """

    local_epochs: int = 2
    name = "finetune"
    personalized = True
