"""A run's results folder: resolved config, per-round metrics, partitions, summary, checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file so a crash never leaves half a file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ResultsFolder:
    """Everything a run writes, in one folder a person or a script can read."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        if (self.path / "summary.json").exists():
            raise FileExistsError(
                f"{self.path} already holds a finished run; set output_dir to a new folder."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("", encoding="utf-8")

    def write_config(self, cfg: DictConfig) -> None:
        """The resolved config, so the run can be repeated from this file alone."""
        _write_atomic(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        """A JSON document such as ``partitions.json`` or ``summary.json``."""
        _write_atomic(self.path / name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def append_metrics(self, line: Mapping[str, Any]) -> None:
        """One round's metrics; flushed at once so a crash loses nothing already measured."""
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_state(self, state: Mapping[str, torch.Tensor], name: str = "global_state.pt") -> None:
        """The global trainable tensors (a few kB), overwritten each round."""
        tmp = self.path / f".{name}.tmp"
        torch.save(dict(state), tmp)
        os.replace(tmp, self.path / name)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All per-round lines written so far."""
        with self.metrics_path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
