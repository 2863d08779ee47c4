"""A small, learnable synthetic image set written in the BiomedCoOp layout and read back by it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedprompt.data.biomedcoop import BiomedCoOpPaths, read_biomedcoop
from fedprompt.data.image_set import (
    DataError,
    DatasetSplits,
    config_classnames,
    resolve_root,
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 30),
    "purple": (120, 50, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("disc", "square", "triangle", "ring", "cross", "stripes")
MAX_CLASSES = len(COLOURS) * len(SHAPES)
DEFAULT_ROOT = "${oc.env:FEDPROMPT_CACHE,.fedprompt-cache}/synthetic"
_MARKER = "complete.json"


def synthetic_classnames(num_classes: int) -> list[str]:
    """Readable, distinct names (``"red disc"``, ``"green square"``, ...) for the classes.

    Class ``c`` pairs colour ``c % 10`` with shape ``(c + c // 10) % 6``, which is a distinct
    pair for every ``c`` below 60.
    """
    colours = list(COLOURS)
    return [
        f"{colours[c % len(colours)]} {SHAPES[(c + c // len(colours)) % len(SHAPES)]}"
        for c in range(num_classes)
    ]


def synthetic_dir_name(params: Mapping[str, Any]) -> str:
    """Folder name encoding every generation parameter, so different sets never collide.

    Custom class names (which change only the split file) add a short hash of the names.
    """
    name = (
        f"SYNTH_c{params['num_classes']}_n{params['train_per_class']}-"
        f"{params['val_per_class']}-{params['test_per_class']}"
        f"_px{params['image_size']}_s{params['seed']}"
    )
    if params["classnames"] != synthetic_classnames(params["num_classes"]):
        digest = hashlib.sha256("\n".join(params["classnames"]).encode()).hexdigest()
        name += f"_names{digest[:8]}"
    return name


def _render(rng: np.random.Generator, classname: str, size: int) -> Image.Image:
    """One image: noisy gray texture, then the class's coloured shape with jittered geometry."""
    colour_name, shape = classname.split(" ")
    base = rng.normal(120.0, 30.0, size=(size, size)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base).filter(ImageFilter.GaussianBlur(radius=max(size / 32, 0.5)))
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(
        int(v) for v in np.clip(np.array(COLOURS[colour_name]) + rng.normal(0, 15, 3), 0, 255)
    )
    radius = size * rng.uniform(0.22, 0.32)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour
        )
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(int(radius / 3), 1))
    elif shape == "cross":
        arm = radius / 3
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    else:
        period = max(int(size / rng.uniform(4, 6)), 2)
        offset = int(rng.integers(0, period))
        for y in range(offset - period, size, period):
            draw.rectangle((0, y, size, y + period // 2 - 1), fill=colour)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, size=(size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _write(target: Path, dir_name: str, params: Mapping[str, Any]) -> None:
    """Write all images, the split file and, last, the completeness marker into ``target``.

    Class ``c`` always looks like ``synthetic_classnames(...)[c]`` (and its folder is named
    after that), whatever names the split file gives the classes.
    """
    looks = synthetic_classnames(params["num_classes"])
    counts = {
        "train": params["train_per_class"],
        "val": params["val_per_class"],
        "test": params["test_per_class"],
    }
    split: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    for label, (look, classname) in enumerate(zip(looks, params["classnames"], strict=True)):
        class_dir = look.replace(" ", "_")
        (target / dir_name / class_dir).mkdir(parents=True)
        for split_id, (split_name, count) in enumerate(counts.items()):
            for i in range(count):
                rng = np.random.default_rng([params["seed"], split_id, label, i])
                rel = f"{class_dir}/{split_name}_{i:04d}.png"
                _render(rng, look, params["image_size"]).save(target / dir_name / rel)
                split[split_name].append([rel, label, classname])
    (target / f"split_{dir_name}.json").write_text(json.dumps(split), encoding="utf-8")
    (target / _MARKER).write_text(json.dumps(params, sort_keys=True), encoding="utf-8")


def generate_synthetic(
    root: str | Path,
    num_classes: int = 4,
    train_per_class: int = 16,
    val_per_class: int = 4,
    test_per_class: int = 16,
    image_size: int = 64,
    seed: int = 0,
    classnames: Sequence[str] | None = None,
) -> Path:
    """Create (or reuse) the synthetic set under ``root`` and return its dataset folder.

    ``classnames`` renames the classes (e.g. a real dataset's, for an offline stand-in);
    by default they are readable descriptions of the pictures ("red disc", ...).

    Generation is deterministic for the parameters, happens in a temporary folder that is
    renamed into place only when complete, and is skipped when a complete copy exists, so
    concurrent callers (simulated sites) never see a half-written set.

    Raises:
        DataError: If a parameter is out of range.
    """
    params: dict[str, Any] = {
        "num_classes": int(num_classes),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "test_per_class": int(test_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
    }
    if not 2 <= params["num_classes"] <= MAX_CLASSES:
        raise DataError(f"Synthetic `num_classes` must lie in 2..{MAX_CLASSES}, got {num_classes}.")
    names = synthetic_classnames(params["num_classes"]) if classnames is None else classnames
    names = [str(n) for n in names]
    if len(names) != params["num_classes"] or len(set(names)) != len(names):
        raise DataError(
            f"Synthetic `classnames` must be {params['num_classes']} distinct names (one per "
            f"class), got {names}."
        )
    params["classnames"] = names
    if params["train_per_class"] < 1 or params["test_per_class"] < 1 or params["val_per_class"] < 0:
        raise DataError(
            "Synthetic `train_per_class` and `test_per_class` must be at least 1 and "
            f"`val_per_class` at least 0, got {train_per_class}, {test_per_class}, "
            f"{val_per_class}."
        )
    if not 8 <= params["image_size"] <= 1024 or params["seed"] < 0:
        raise DataError(
            f"Synthetic `image_size` must lie in 8..1024 and `seed` be >= 0, got "
            f"{image_size} and {seed}."
        )
    base = Path(root)
    dir_name = synthetic_dir_name(params)
    final = BiomedCoOpPaths(base, dir_name).dataset_dir
    if _is_complete(final, params):
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dir_name}-", dir=base))
    try:
        _write(tmp, dir_name, params)
        if final.exists() and not _is_complete(final, params):
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_complete(folder: Path, params: Mapping[str, Any]) -> bool:
    marker = folder / _MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == params
    except (OSError, json.JSONDecodeError):
        return False


def load_synthetic(cfg: Mapping[str, Any]) -> DatasetSplits:
    """Generate (or reuse) the set a ``format: synthetic`` config describes and read it back.

    Config keys: ``num_classes``, ``train_per_class``, ``val_per_class``, ``test_per_class``,
    ``image_size``, ``seed``, ``root`` and optional ``classnames``, which rename the classes;
    the default picture names ("red disc", ...) instead follow ``num_classes``, so overriding
    ``num_classes`` alone works.

    The production BiomedCoOp reader does the reading, so tests on synthetic data exercise it.
    """
    root = resolve_root(cfg.get("root"), default=DEFAULT_ROOT)
    params = {
        "num_classes": int(cfg.get("num_classes", 4)),
        "train_per_class": int(cfg.get("train_per_class", 16)),
        "val_per_class": int(cfg.get("val_per_class", 4)),
        "test_per_class": int(cfg.get("test_per_class", 16)),
        "image_size": int(cfg.get("image_size", 64)),
        "seed": int(cfg.get("seed", 0)),
    }
    names = config_classnames(cfg)
    if names is not None and names == synthetic_classnames(len(names)):
        names = None
    folder = generate_synthetic(root, **params, classnames=names)
    return read_biomedcoop(root, folder.name, name=str(cfg.get("name") or "synthetic"))
