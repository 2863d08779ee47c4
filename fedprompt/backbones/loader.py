"""Loads the frozen CLIP backbone once per process: BiomedCLIP, offline copies and miniatures.

Specs:
    ``biomedclip``: BiomedCLIP from the Hugging Face hub, or from the HF cache with
        ``HF_HUB_OFFLINE=1``.
    ``local-dir:/abs/dir``: an offline copy of BiomedCLIP (or any open_clip model) in a folder.
    ``biomedclip-random``: BiomedCLIP's architecture with seeded random weights, no download.
    ``miniature`` / ``miniature-native``: tiny seeded models (BERT or native causal text tower),
        built offline into the fedprompt cache and loaded through the ``local-dir:`` path.

Using BiomedCLIP offline: on a machine with network run ``fedprompt backbone save-local /abs/dir``
(``save_local_copy``), copy the folder to the offline machine (to the same absolute path, or
re-home it there with ``fedprompt backbone save-local /new/dir --source local-dir:/where/it/is``),
then run with ``backbone=local_dir backbone.path=/abs/dir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from fedprompt.backbones.miniature import (
    BUILD_FORMAT,
    build_directory_atomically,
    build_miniature,
    seeded,
    write_architecture_dir,
)
from fedprompt.network import hub_offline, offline_requested, quiet_hub_retries, unreachable

BIOMEDCLIP_HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
RANDOM_WEIGHTS_SEED = 0
_SPEC_KINDS = ("biomedclip", "biomedclip-random", "local-dir", "miniature", "miniature-native")
_LOCAL_DIR_PREFIX = "local-dir:"
_HUB_PREFIX = "hf-hub:"
_CHECKPOINT_PATTERNS = ("*.safetensors", "*.bin", "*.pth")

_CACHE: dict[tuple[str, str, str], Backbone] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(eq=False)
class Backbone:
    """A frozen open_clip model with its tokenizer and image transforms.

    Shared by every learner and simulated site of a process; never trained, so it stays in eval
    mode with ``requires_grad`` off everywhere.
    """

    spec: str
    model: torch.nn.Module = field(repr=False)
    tokenizer: Callable[[Sequence[str]], torch.Tensor] = field(repr=False)
    preprocess: Callable = field(repr=False)
    preprocess_train: Callable = field(repr=False)
    text_kind: Literal["hf_bert", "native"]
    image_size: int
    embed_dim: int
    device: torch.device

    def __copy__(self) -> Backbone:
        return self

    def __deepcopy__(self, memo: dict) -> Backbone:
        """The same object: a backbone is a per-process singleton that copied learners share."""
        return self

    @contextlib.contextmanager
    def _frozen_forward(self) -> Iterator[None]:
        """No autograd, and bf16 autocast on CUDA: the frozen towers need neither grads nor fp32."""
        on_gpu = self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=on_gpu):
            yield

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image features (B, D); cacheable, as the image tower is frozen."""
        with self._frozen_forward():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (B, D) as ``encode_images`` gives them, and patch tokens (B, P, D).

        The patch tokens are the trunk's final spatial tokens (``forward_features``, prefix tokens
        dropped) passed through the tower's own projection head, so that they live in the joint
        image-text space and can be compared with text features; they are not L2-normalised.
        Only timm ViT towers (BiomedCLIP's kind) expose them.

        Raises:
            ValueError: The image tower is not an open_clip ``TimmModel`` over a timm ViT.
        """
        visual = self.model.visual
        trunk = getattr(visual, "trunk", None)
        if not (hasattr(trunk, "forward_features") and hasattr(trunk, "num_prefix_tokens")):
            raise ValueError(
                f"{self.spec}'s image tower ({type(visual).__name__}) exposes no patch tokens; "
                "methods that need them run on timm ViT towers (biomedclip, miniature)."
            )
        with self._frozen_forward():
            tokens = trunk.forward_features(pixels.to(self.device, non_blocking=True))
            pooled = visual.head(trunk.forward_head(tokens))
            patches = visual.head(tokens[:, trunk.num_prefix_tokens :])
        return F.normalize(pooled.float(), dim=-1), patches.float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 text features (N, D) of tokenized prompts."""
        with self._frozen_forward():
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def logit_scale(self) -> float:
        """The model's learned softmax temperature, exponentiated (``logit_scale`` is a log)."""
        return float(self.model.logit_scale.exp().item())

    def num_parameters(self) -> int:
        """Number of parameters of the whole (frozen) model."""
        return sum(p.numel() for p in self.model.parameters())


class BackboneUnavailableError(RuntimeError):
    """The requested backbone cannot be loaded here; the message names the ways out."""


def default_cache_dir() -> Path:
    """The root of fedprompt's build cache: ``$FEDPROMPT_CACHE``, else ``~/.cache/fedprompt``."""
    configured = os.environ.get("FEDPROMPT_CACHE")
    return Path(configured or "~/.cache/fedprompt").expanduser().absolute()


def list_backbones() -> list[str]:
    """The spec kinds ``load_backbone`` understands (``local-dir`` takes ``:/abs/dir``)."""
    return list(_SPEC_KINDS)


def clear_backbone_cache() -> None:
    """Forgets every loaded backbone, so that the next ``load_backbone`` loads afresh."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_backbone(
    spec: str,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Loads a frozen backbone, once per process for each spec and device.

    Args:
        spec: ``biomedclip``, ``biomedclip-random``, ``miniature``, ``miniature-native`` or
            ``local-dir:/abs/dir`` (see the module docstring).
        device: Where the model lives.
        cache_dir: Root of fedprompt's build cache (miniatures, ``biomedclip-random``); defaults
            to ``default_cache_dir()``. The hub model uses the Hugging Face cache instead.

    Returns:
        The shared ``Backbone``; later calls with the same arguments return the same object.

    Raises:
        BackboneUnavailableError: The model or its files cannot be had here.
        ValueError: Unknown spec.
    """
    device = torch.device(device)
    kind, argument = _parse_spec(spec)
    root = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir()
    if kind == "local-dir":
        location = argument
    elif kind == "biomedclip":
        location = ""  # the Hugging Face cache, whatever cache_dir says
    else:
        location = str(root)
    key = (kind, location, str(device))
    with _CACHE_LOCK:
        backbone = _CACHE.get(key)
        if backbone is None:
            backbone = _load(spec, kind, argument, root, device)
            _CACHE[key] = backbone
        return backbone


def _parse_spec(spec: str) -> tuple[str, str]:
    if spec.startswith(_LOCAL_DIR_PREFIX):
        path = spec[len(_LOCAL_DIR_PREFIX) :]
        if not path:
            raise ValueError("backbone spec 'local-dir:' needs a folder, as in local-dir:/abs/dir")
        return "local-dir", str(Path(path).expanduser().absolute())
    if spec in _SPEC_KINDS and spec != "local-dir":
        return spec, ""
    raise ValueError(
        f"unknown backbone spec {spec!r}; expected one of "
        "biomedclip, biomedclip-random, miniature, miniature-native or local-dir:/abs/dir"
    )


def _load(spec: str, kind: str, argument: str, root: Path, device: torch.device) -> Backbone:
    import open_clip

    if kind == "biomedclip":
        return _load_from_hub(spec, device)
    if kind == "local-dir":
        return _load_local_dir(spec, Path(argument), device)
    if kind in ("miniature", "miniature-native"):
        text_kind = "hf_bert" if kind == "miniature" else "native"
        folder = build_miniature(root / f"{kind}-v{BUILD_FORMAT}", text_kind=text_kind)
        return _load_local_dir(spec, folder, device)
    folder = write_architecture_dir(root / f"biomedclip-random-v{BUILD_FORMAT}", "biomedclip")
    with seeded(RANDOM_WEIGHTS_SEED):
        model = open_clip.create_model(
            f"local-dir:{folder}", load_weights=False, pretrained_text=False, device=device
        )
    return _wrap(spec, model, open_clip.get_tokenizer(f"local-dir:{folder}"), device)


def _unavailable_message(reason: str | None = None) -> str:
    why = f" ({reason}, and the cache holds no copy)" if reason else ""
    return (
        f"BiomedCLIP ({BIOMEDCLIP_HUB_ID}) could not be loaded from the Hugging Face hub or its "
        f"local cache{why}: use an offline copy with `backbone=local_dir "
        "backbone.path=/abs/dir` (make one with `fedprompt backbone save-local /abs/dir` on a "
        "machine with network and copy the folder over), or download it once elsewhere and run "
        "with HF_HUB_OFFLINE=1 on that Hugging Face cache, or use `backbone=miniature` for an "
        "offline test run."
    )


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def _load_from_hub(spec: str, device: torch.device) -> Backbone:
    import open_clip
    from huggingface_hub import constants, try_to_load_from_cache

    name = _HUB_PREFIX + BIOMEDCLIP_HUB_ID
    cache = _hf_hub_cache()
    cached = isinstance(
        try_to_load_from_cache(BIOMEDCLIP_HUB_ID, "open_clip_config.json", cache_dir=cache), str
    )
    # Fail at once when offline without a cached copy, instead of retrying the network for half
    # a minute.
    if offline_requested() and not cached:
        missing = FileNotFoundError(f"HF_HUB_OFFLINE is set and {cache} holds no {name}")
        raise BackboneUnavailableError(_unavailable_message()) from missing
    reason = None if offline_requested() else unreachable(constants.ENDPOINT)
    if reason and not cached:
        raise BackboneUnavailableError(_unavailable_message(reason)) from ConnectionError(reason)
    # Without the hub, a cached copy is loaded as HF_HUB_OFFLINE=1 would, with no retries first.
    serve = hub_offline() if reason else contextlib.nullcontext()
    try:
        with serve, quiet_hub_retries():
            model = open_clip.create_model_from_pretrained(
                name, device=device, return_transform=False
            )
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:
        raise BackboneUnavailableError(_unavailable_message()) from err
    return _wrap(spec, model, tokenizer, device)


def _find_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for pattern in _CHECKPOINT_PATTERNS for p in folder.glob(pattern))
    return found[0] if found else None


def _check_local_dir(folder: Path) -> None:
    remedy = (
        "make the folder with `fedprompt backbone save-local /abs/dir` on a machine with network "
        "and pass it as backbone=local_dir backbone.path=/abs/dir"
    )
    if not folder.is_dir():
        raise BackboneUnavailableError(f"Backbone folder {folder} does not exist; {remedy}.")
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise BackboneUnavailableError(f"{folder} has no open_clip_config.json; {remedy}.")
    try:
        text_cfg = json.loads(config_path.read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
    except (ValueError, KeyError, TypeError) as err:
        raise BackboneUnavailableError(
            f"{config_path} is not an open_clip config with model_cfg.text_cfg; {remedy}."
        ) from err
    if _find_checkpoint(folder) is None:
        raise BackboneUnavailableError(
            f"{folder} has no weights (*.safetensors, *.bin or *.pth); {remedy}."
        )
    text_model = text_cfg.get("hf_model_name")
    if text_model and text_model.startswith(("/", ".", "~")) and not Path(text_model).is_dir():
        raise BackboneUnavailableError(
            f"text_cfg.hf_model_name in {config_path} points to {text_model}, which does not "
            f"exist (was the folder moved?); {remedy}."
        )
    if text_cfg.get("hf_tokenizer_name") and not any(
        (folder / name).is_file()
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    ):
        raise BackboneUnavailableError(f"{folder} has no tokenizer files; {remedy}.")


def _load_local_dir(spec: str, folder: Path, device: torch.device) -> Backbone:
    import open_clip

    _check_local_dir(folder)
    name = _LOCAL_DIR_PREFIX + str(folder)
    try:
        model = open_clip.create_model_from_pretrained(name, device=device, return_transform=False)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
        text_model = config["model_cfg"]["text_cfg"].get("hf_model_name")
        hint = (
            f" (its text_cfg.hf_model_name {text_model!r} is no local folder, so needs the hub)"
            if text_model and not Path(text_model).is_dir()
            else ""
        )
        raise BackboneUnavailableError(
            f"The backbone in {folder} could not be loaded{hint}: {type(err).__name__}: {err}; "
            "rebuild it with `fedprompt backbone save-local`."
        ) from err
    return _wrap(spec, model, tokenizer, device)


def _wrap(spec: str, model: torch.nn.Module, tokenizer: Callable, device: torch.device) -> Backbone:
    from open_clip import CLIP, CustomTextCLIP
    from open_clip.hf_model import HFTextEncoder
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model.eval()
    model.requires_grad_(False)
    if isinstance(model, CustomTextCLIP) and isinstance(model.text, HFTextEncoder):
        text_kind: Literal["hf_bert", "native"] = "hf_bert"
        embed_dim = int(model.text.output_dim)
    elif isinstance(model, CLIP):
        text_kind = "native"
        projection = model.text_projection
        embed_dim = int(
            projection.out_features
            if isinstance(projection, torch.nn.Linear)
            else projection.shape[-1]
        )
    else:
        raise BackboneUnavailableError(
            f"{spec} has a text tower fedprompt cannot splice prompts into "
            f"({type(model).__name__}); use an open_clip CLIP or an HF-text CustomTextCLIP."
        )
    preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    size = preprocess_cfg.size
    return Backbone(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        preprocess=image_transform_v2(preprocess_cfg, is_train=False),
        preprocess_train=image_transform_v2(preprocess_cfg, is_train=True),
        text_kind=text_kind,
        image_size=int(size if isinstance(size, int) else size[0]),
        embed_dim=embed_dim,
        device=device,
    )


def save_local_copy(
    directory: str | os.PathLike, source: str = _HUB_PREFIX + BIOMEDCLIP_HUB_ID
) -> Path:
    """Writes an offline ``local-dir:`` copy of BiomedCLIP (run it where the hub is reachable).

    The folder gets ``open_clip_config.json`` with ``text_cfg.hf_model_name`` and
    ``hf_tokenizer_name`` rewritten to the folder itself, the open_clip checkpoint, and the BERT
    config and tokenizer files, which is everything ``local-dir:`` needs without network. It is
    built in a temporary sibling and renamed into place; an existing complete copy is reused.

    Args:
        directory: Destination folder (absolute paths are written into its config).
        source: ``hf-hub:<repo>`` (default: BiomedCLIP) or ``local-dir:<folder>`` to re-home an
            existing copy, e.g. after moving it to another path or machine.

    Returns:
        The absolute path of the copy; load it with ``load_backbone('local-dir:' + str(path))``.
    """
    from transformers import AutoConfig, AutoTokenizer

    target = Path(directory).expanduser().absolute()
    if source.startswith(_HUB_PREFIX):
        from huggingface_hub import constants, hf_hub_download
        from open_clip.pretrained import download_pretrained_from_hf

        reason = unreachable(constants.ENDPOINT)
        if reason:
            raise BackboneUnavailableError(
                f"{source} cannot be downloaded here: {reason}; run this command on a machine "
                "with network and copy the folder over."
            )
        repo = source[len(_HUB_PREFIX) :]
        config_path = Path(hf_hub_download(repo, "open_clip_config.json"))
        checkpoint = Path(download_pretrained_from_hf(repo))
        tokenizer_source = None
    elif source.startswith(_LOCAL_DIR_PREFIX):
        folder = Path(source[len(_LOCAL_DIR_PREFIX) :]).expanduser().absolute()
        _check_local_dir(folder)
        config_path = folder / "open_clip_config.json"
        checkpoint = _find_checkpoint(folder)
        tokenizer_source = str(folder)
    else:
        raise ValueError(f"source must start with 'hf-hub:' or 'local-dir:', got {source!r}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text_cfg = config["model_cfg"]["text_cfg"]
    text_source = text_cfg.get("hf_model_name")
    tokenizer_source = tokenizer_source or text_cfg.get("hf_tokenizer_name")

    def build(tmp: Path) -> None:
        shutil.copyfile(checkpoint, tmp / checkpoint.name)
        if text_source:
            AutoConfig.from_pretrained(text_source).save_pretrained(str(tmp))
            text_cfg["hf_model_name"] = str(target)
        if tokenizer_source:
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(str(tmp))
            text_cfg["hf_tokenizer_name"] = str(target)
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    manifest = {"kind": "local-copy", "format": BUILD_FORMAT, "path": str(target)}
    return build_directory_atomically(target, build, manifest, replace_stale=False)
