"""Offline builds of backbone folders: the miniature models and BiomedCLIP's bare architecture."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import string
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

MANIFEST_NAME = ".fedprompt-build.json"
BUILD_FORMAT = 1
CHECKPOINT_NAME = "open_clip_pytorch_model.bin"

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCTUATION = ".,;:!?'\"()[]-/%+&*#=<>_"
# Whole-word entries so that prompts of the medical benchmarks tokenize to a realistic length;
# everything else falls back to single characters.
_WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "a an the of in on with and or no not is are this that photo image picture scan slice "
    "view showing shows contains type class sign signs case patient medical clinical normal "
    "abnormal healthy benign malignant tumor tumour cancer lesion mass nodule cyst brain mri "
    "ct x ray xray chest lung lungs pneumonia covid tuberculosis glioma meningioma pituitary "
    "breast ultrasound retina retinal fundus eye skin mole melanoma nevus carcinoma cell "
    "cells tissue blood colon polyp kidney liver bone fracture knee heart organ "
    "adenocarcinoma squamous histopathology pathology dermoscopy endoscopy microscopy left "
    "right small large"
).split()

# Seeded model construction uses torch's global generator; one build at a time per process.
_SEED_LOCK = threading.Lock()


def read_model_config(name: str) -> dict[str, Any]:
    """Returns a bundled architecture description (``model_configs/<name>.json``).

    Each holds ``open_clip_config`` (the layout open_clip reads from a ``local-dir:``) and, for a
    BERT text tower, ``bert_config`` (keyword arguments of ``transformers.BertConfig``).
    """
    with open(_CONFIG_DIR / f"{name}.json", encoding="utf-8") as handle:
        return json.load(handle)


def _fingerprint(config: Mapping[str, Any]) -> str:
    """Short digest of an architecture description, so that editing it invalidates old builds."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def generated_vocab(size: int | None = None) -> list[str]:
    """A deterministic WordPiece vocabulary: BERT's special tokens, characters and common words.

    Args:
        size: Pad with ``[unusedN]`` entries to exactly this many tokens (BiomedBERT has 30522), so
            the embedding table has the real model's shape; ``None`` keeps the vocabulary minimal.
    """
    characters = list(string.ascii_lowercase + string.digits + _PUNCTUATION)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = list(_SPECIAL_TOKENS) + characters + pieces
    vocab += [word for word in dict.fromkeys(_WORDS) if word not in vocab]
    if size is not None:
        if size < len(vocab):
            raise ValueError(f"vocab size {size} is below the {len(vocab)} generated tokens")
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


def write_bert_files(directory: Path, bert_config: Mapping[str, Any]) -> None:
    """Writes a BERT tokenizer (from a generated vocabulary) and ``config.json`` into a folder.

    These are the files open_clip's ``HFTextEncoder`` and ``HFTokenizer`` read from a local path.
    """
    from transformers import BertConfig, BertTokenizerFast

    directory = Path(directory)
    vocab = generated_vocab(bert_config.get("vocab_size"))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    BertConfig(**{**bert_config, "vocab_size": len(vocab)}).save_pretrained(str(directory))


def write_open_clip_config(
    directory: Path, open_clip_config: Mapping[str, Any], text_dir: Path | None
) -> None:
    """Writes ``open_clip_config.json``, pointing an HF text tower and tokenizer at ``text_dir``.

    open_clip resolves ``text_cfg.hf_model_name`` itself (``AutoConfig.from_pretrained``), so it
    must name the folder that finally holds the BERT files, not a hub repository.
    """
    config = copy.deepcopy(dict(open_clip_config))
    text_cfg = config["model_cfg"]["text_cfg"]
    if "hf_model_name" in text_cfg:
        if text_dir is None:
            raise ValueError("an HF text tower needs the folder of its BERT files")
        text_cfg["hf_model_name"] = str(text_dir)
        text_cfg["hf_tokenizer_name"] = str(text_dir)
    with open(Path(directory) / "open_clip_config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch's global generator for a block and restores it afterwards.

    Model constructors draw their initial weights from the global generator; forking it keeps the
    caller's random stream untouched and makes the weights a function of ``seed`` alone.
    """
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _is_complete(target: Path, manifest: Mapping[str, Any]) -> bool:
    try:
        with open(target / MANIFEST_NAME, encoding="utf-8") as handle:
            return json.load(handle) == dict(manifest)
    except (OSError, ValueError):
        return False


def build_directory_atomically(
    target: str | os.PathLike,
    build: Callable[[Path], None],
    manifest: Mapping[str, Any],
    *,
    replace_stale: bool = True,
) -> Path:
    """Builds a folder in a private temporary sibling, then renames it into place.

    Several processes (e.g. simulated sites) may build the same folder at once: each builds its
    own copy, the first rename wins and the others discard theirs. A folder counts as complete
    when its manifest file equals ``manifest``; a complete folder is reused without building.

    Args:
        target: The folder to create.
        build: Writes the folder's contents into the temporary folder it is given.
        manifest: JSON-serialisable description of the build, written last.
        replace_stale: Replace an existing incomplete or different folder at ``target``; when
            False, such a folder (unless empty) raises ``FileExistsError`` instead.

    Returns:
        The absolute path of the complete folder.
    """
    target = Path(target).expanduser().absolute()
    if _is_complete(target, manifest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
        build(tmp)
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as handle:
            json.dump(dict(manifest), handle, sort_keys=True)
        _move_into_place(tmp, target, manifest, replace_stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(
    tmp: Path, target: Path, manifest: Mapping[str, Any], replace_stale: bool
) -> None:
    for _ in range(5):
        try:
            os.rename(tmp, target)  # atomic; also replaces an empty folder
            return
        except OSError:
            if _is_complete(target, manifest):
                return  # another process finished first
            if not target.exists():
                continue
            if not replace_stale:
                raise FileExistsError(
                    f"{target} exists and is not a complete build; remove it or choose another"
                ) from None
            aside = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    if not _is_complete(target, manifest):
        raise RuntimeError(f"could not move the build of {target} into place")


def build_miniature(
    directory: str | os.PathLike,
    *,
    text_kind: Literal["hf_bert", "native"] = "hf_bert",
    seed: int = 0,
) -> Path:
    """Builds (once) a tiny model of a CLIP family as a folder that ``local-dir:`` loads.

    ``hf_bert`` mirrors BiomedCLIP (timm ViT ``test_vit`` + a two-layer BERT text tower, CLS
    pooling, MLP projection); ``native`` is an open_clip ``CLIP`` with a causal text transformer
    and the bundled BPE tokenizer. Weights are random but seeded, so every process builds the same
    model, and the folder is loaded through the production ``local-dir:`` path, which is the point.
    The tiny BERT draws its weights with std 0.3 instead of BERT's 0.02: at 0.02 it maps every
    class prompt to nearly the same feature, and nothing could be learned on it.

    Args:
        directory: Destination folder; reused when it already holds this build.
        text_kind: Which text tower family to build.
        seed: Seed of the random weights.

    Returns:
        The absolute path of the folder.
    """
    import open_clip

    if text_kind not in ("hf_bert", "native"):
        raise ValueError(f"text_kind must be 'hf_bert' or 'native', got {text_kind!r}")
    target = Path(directory).expanduser().absolute()
    spec = read_model_config("miniature" if text_kind == "hf_bert" else "miniature-native")
    has_bert = "bert_config" in spec

    def build(tmp: Path) -> None:
        if has_bert:
            write_bert_files(tmp, spec["bert_config"])
        write_open_clip_config(tmp, spec["open_clip_config"], tmp if has_bert else None)
        with seeded(seed):
            model = open_clip.create_model(
                f"local-dir:{tmp}", load_weights=False, pretrained_text=False
            )
        torch.save(model.state_dict(), tmp / CHECKPOINT_NAME)
        write_open_clip_config(tmp, spec["open_clip_config"], target if has_bert else None)

    manifest = {
        "kind": "miniature",
        "format": BUILD_FORMAT,
        "text_kind": text_kind,
        "seed": seed,
        "config": _fingerprint(spec),
        "path": str(target),
    }
    return build_directory_atomically(target, build, manifest)


def write_architecture_dir(directory: str | os.PathLike, name: str) -> Path:
    """Builds (once) a weightless ``local-dir:`` folder: config and tokenizer of a bundled model.

    Used for ``biomedclip-random``: open_clip builds the architecture from it with random weights,
    without any download and without writing hundreds of megabytes of weights to disk.
    """
    target = Path(directory).expanduser().absolute()
    spec = read_model_config(name)
    has_bert = "bert_config" in spec

    def build(tmp: Path) -> None:
        if has_bert:
            write_bert_files(tmp, spec["bert_config"])
        write_open_clip_config(tmp, spec["open_clip_config"], target if has_bert else None)

    manifest = {
        "kind": "architecture",
        "format": BUILD_FORMAT,
        "name": name,
        "config": _fingerprint(spec),
        "path": str(target),
    }
    return build_directory_atomically(target, build, manifest)
