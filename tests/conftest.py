"""Shared fixtures: the two miniature backbones, built offline once per test session."""

import os
from pathlib import Path

import pytest

from fedprompt.backbones import Backbone, load_backbone


@pytest.fixture(scope="session")
def backbone_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build cache of the session; ``FEDPROMPT_TEST_CACHE`` keeps builds across sessions."""
    configured = os.environ.get("FEDPROMPT_TEST_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("fedprompt-cache")


@pytest.fixture(scope="session")
def miniature_backbone(backbone_cache_dir: Path) -> Backbone:
    """Tiny BiomedCLIP-family model (timm ViT + BERT), loaded through ``local-dir:``."""
    return load_backbone("miniature", cache_dir=backbone_cache_dir)


@pytest.fixture(scope="session")
def miniature_native_backbone(backbone_cache_dir: Path) -> Backbone:
    """Tiny open_clip native CLIP (causal text transformer, BPE tokenizer)."""
    return load_backbone("miniature-native", cache_dir=backbone_cache_dir)
