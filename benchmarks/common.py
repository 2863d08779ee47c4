"""Shared helpers of the benchmarks: the machine line, synthetic images, interleaved timing."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedprompt.data.image_set import ImageSet
from fedprompt.data.synthetic import load_synthetic

BTMRI_CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def machine_line() -> str:
    """CPU model, cores, torch threads and versions, and the date: what a figure was taken on."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {gpu}, {datetime.date.today().isoformat()}"
    )


def synthetic_images(root: Path, per_class: int, image_size: int = 224) -> ImageSet:
    """``4 * per_class`` generated PNG images (coloured shapes on noise), read from files."""
    splits = load_synthetic(
        {
            "name": "synthetic",
            "format": "synthetic",
            "root": str(root),
            "num_classes": 4,
            "train_per_class": per_class,
            "val_per_class": 0,
            "test_per_class": 1,
            "image_size": image_size,
            "seed": 0,
        }
    )
    return splits.train


def interleaved_seconds(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Seconds of each run per repeat, the runs taking turns so machine drift hits all alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """The median, which shrugs off the odd slow repeat on a shared machine."""
    return statistics.median(values)
