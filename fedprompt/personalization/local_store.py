"""A site's local prompt tensors on its own disk, one file per round, so they outlive the process.

The node's state keeps them between rounds while the SuperNode runs; this store keeps them across
a SuperNode restart and a resumed run. Each round's tensors go to ``round-<r>.safetensors``
(written to a temporary file and renamed, so a crash never leaves half a file); a round reads
the newest file no later than the round it continues from, so a run resumed from its round-k
checkpoint continues from the site's round-k tensors even if the site had gone further.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedprompt.data.image_set import DataError

_NAME = re.compile(r"round-(\d+)\.safetensors")


class LocalStore:
    """The local tensors of one site in one run (a folder of per-round files).

    Args:
        directory: The folder, inside the site's own state folder.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def rounds(self) -> list[int]:
        """The rounds saved, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, server_round: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep the tensors of ``server_round`` (replacing an earlier save of that round)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"round-{server_round}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def latest(self, through_round: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest saved round ``<= through_round`` and its tensors; None if there is none."""
        earlier = [r for r in self.rounds() if r <= through_round]
        if not earlier:
            return None
        newest = earlier[-1]
        path = self.directory / f"round-{newest}.safetensors"
        try:
            return newest, load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise DataError(
                f"The site's personalized tensors of round {newest}, {path}, cannot be read "
                f"({err}); restore the file from a backup, or delete it and the site continues "
                "from its newest earlier round."
            ) from err
