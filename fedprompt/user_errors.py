"""Errors a person can act on: the CLI and the Flower apps print their sentence, no traceback."""

from fedprompt.backbones import BackboneUnavailableError
from fedprompt.config import ConfigError
from fedprompt.data.image_set import DataError
from fedprompt.text.descriptions import DescriptionsError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    BackboneUnavailableError,
    DescriptionsError,
    FileExistsError,
)
