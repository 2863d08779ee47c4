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

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        """Start a new results folder, or with ``resume`` reopen one to continue its run.

        Raises:
            FileExistsError: A new run would overwrite a finished one.
            FileNotFoundError: The folder to resume does not exist.
        """
        self.path = Path(path).resolve()
        self.metrics_path = self.path / "metrics.jsonl"
        if resume:
            if not self.path.is_dir():
                raise FileNotFoundError(
                    f"Cannot resume from {self.path}: no such folder; give the results folder "
                    "of the run to continue."
                )
            self.metrics_path.touch()
            # A finished run that is continued is no longer finished until it ends again.
            (self.path / "summary.json").unlink(missing_ok=True)
            return
        if (self.path / "summary.json").exists():
            raise FileExistsError(
                f"{self.path} already holds a finished run; set output_dir to a new folder, "
                "or continue it with resume= and more federation.rounds."
            )
        self.path.mkdir(parents=True, exist_ok=True)
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
        self.save_torch(name, dict(state))

    def save_torch(self, name: str, data: Mapping[str, Any]) -> None:
        """A ``torch.save`` file written atomically (the checkpoint, the global state)."""
        tmp = self.path / f".{name}.tmp"
        torch.save(dict(data), tmp)
        os.replace(tmp, self.path / name)

    def keep_metrics_through(self, last_round: int) -> list[dict[str, Any]]:
        """Drop lines of rounds after ``last_round`` (written after the last checkpoint).

        A resumed run repeats those rounds and writes their lines again, so the file ends up
        with one line per round, as an uninterrupted run's.
        """
        kept = [line for line in self.read_metrics() if int(line["round"]) <= last_round]
        _write_atomic(self.metrics_path, "".join(json.dumps(line) + "\n" for line in kept))
        return kept

    def read_metrics(self) -> list[dict[str, Any]]:
        """All per-round lines written so far."""
        with self.metrics_path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
