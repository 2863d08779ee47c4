"""What SecAgg+ costs per round against plain FedAvg: seconds and bytes, at 3 and 10 sites.

Usage: python benchmarks/secure_aggregation_cost.py [--sites 3,10] [--rounds 4]
       [--engine simulation|inprocess]

For each site count the same quickstart run (miniature backbone, cached features) goes twice,
side by side: plain FedAvg and ``federation.secure_aggregation=true``. Per round the script reads
``metrics.jsonl``: ``seconds`` (median over the rounds after the first, which loads the backbone
and encodes the images), and ``bytes_up`` / ``bytes_down`` (tensors plus the bytes of SecAgg+'s
keys, encrypted shares and masked vectors, summed over the sites).

- ``simulation``: ``fedprompt simulate`` through Flower's simulation engine (a private SuperLink,
  Ray actors), so SecAgg+'s four exchanges pay Flower's per-message cost;
- ``inprocess``: every site's ClientApp answered in this process (no SuperLink, no Ray): the
  protocol's own computation (key agreement, secret sharing, masking, unmasking) only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_line


def _lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _run_simulation(folder: Path, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "fedprompt.cli", "simulate", "quickstart", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return _lines(folder)


def _run_inprocess(folder: Path, overrides: list[str]) -> list[dict]:
    from fedprompt.config import compose_config
    from fedprompt.federation.inprocess_grid import InProcessGrid
    from fedprompt.federation.orchestration import run_federation
    from fedprompt.federation.run_config import default_run_config

    cfg = compose_config("quickstart", overrides)
    sites = int(cfg.federation.num_sites)
    grid = InProcessGrid(
        [{"partition-id": i, "num-partitions": sites} for i in range(sites)],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
    )
    run_federation(grid, cfg)
    return _lines(folder)


def _per_round(lines: list[dict]) -> dict[str, float]:
    later = lines[1:] or lines
    return {
        "seconds": statistics.median(line["seconds"] for line in later),
        "bytes_up": statistics.median(line["bytes_up"] for line in later),
        "bytes_down": statistics.median(line["bytes_down"] for line in later),
        "trained": min(line["num_trained"] for line in lines),
    }


def main() -> None:
    """Run plain and secure rounds side by side for each site count and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", default="3,10")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--engine", choices=("simulation", "inprocess"), default="simulation")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    print(machine_line())
    print(f"engine: {args.engine}, {args.rounds} rounds, quickstart (miniature backbone)")
    run = _run_simulation if args.engine == "simulation" else _run_inprocess
    print(
        "| sites | FedAvg s/round | SecAgg+ s/round | x | FedAvg up/down kB "
        "| SecAgg+ up/down kB | x up |"
    )
    print("|---" * 7 + "|")
    with tempfile.TemporaryDirectory(prefix="fedprompt-secagg-") as tmp:
        for sites in (int(s) for s in args.sites.split(",")):
            figures = {}
            for secure in (False, True):
                folder = Path(tmp) / f"{sites}-{secure}"
                overrides = [
                    f"federation.num_sites={sites}",
                    f"federation.rounds={args.rounds}",
                    f"federation.secure_aggregation={str(secure).lower()}",
                    "federation.client_cpus=1",
                    f"output_dir={folder}",
                ]
                figures[secure] = _per_round(run(folder, overrides))
                if figures[secure]["trained"] != sites:
                    raise RuntimeError(f"a round aggregated fewer than {sites} sites: {figures}")
            plain, secure = figures[False], figures[True]
            print(
                f"| {sites} | {plain['seconds']:.2f} | {secure['seconds']:.2f} | "
                f"x{secure['seconds'] / plain['seconds']:.2f} | "
                f"{plain['bytes_up'] / 1024:.1f} / {plain['bytes_down'] / 1024:.1f} | "
                f"{secure['bytes_up'] / 1024:.1f} / {secure['bytes_down'] / 1024:.1f} | "
                f"x{secure['bytes_up'] / plain['bytes_up']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
