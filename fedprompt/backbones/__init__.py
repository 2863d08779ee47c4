"""Frozen CLIP backbones (BiomedCLIP, offline copies, miniatures), loaded once per process."""

from fedprompt.backbones.loader import (
    BIOMEDCLIP_HUB_ID,
    Backbone,
    BackboneUnavailableError,
    clear_backbone_cache,
    default_cache_dir,
    list_backbones,
    load_backbone,
    save_local_copy,
)
from fedprompt.backbones.miniature import build_miniature

__all__ = [
    "BIOMEDCLIP_HUB_ID",
    "Backbone",
    "BackboneUnavailableError",
    "build_miniature",
    "clear_backbone_cache",
    "default_cache_dir",
    "list_backbones",
    "load_backbone",
    "save_local_copy",
]
