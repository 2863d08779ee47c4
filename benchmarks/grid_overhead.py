"""The fixed cost of each run of a grid: one simulation per run against one session for all.

Usage: python benchmarks/grid_overhead.py [--quick] [--seeds 6] [--rounds 1]
       [--backbone miniature] [--override KEY=VALUE ...]

The same grid of runs (the quickstart, seeds 1..N, each seed once centralized on one site and
once federated on three) runs twice in one invocation, through ``run_grid`` as ``fedprompt
table`` runs it: the old way, one Flower simulation per run (``run_point``: a SuperLink,
``flwr run``, Ray, actors and a backbone each), and the new way, every run in one simulation
whose actors stay warm (``run_session``). A run's fixed cost is the grid's wall time minus the
rounds' own seconds (``metrics.jsonl``), divided by the runs; round 1 is reported apart, as it
pays for the actors' start. The feature cache is filled first, so neither way encodes images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import machine_line

from fedprompt.experiments.grid import Point, run_grid, run_point


def grid(seeds: int, rounds: int, backbone: str, extra: Sequence[str] = ()) -> list[Point]:
    """Seeds 1..``seeds``, each centralized (one site) and federated (three sites).

    ``extra``: overrides every run adds (``device=cuda federation.client_gpus=0.25`` on a GPU).
    """
    points = []
    for seed in range(1, seeds + 1):
        for name, sites in (("central", 1), ("federated", 3)):
            overrides = (
                f"seed={seed}",
                f"backbone={backbone}",
                f"federation.num_sites={sites}",
                f"federation.rounds={rounds}",
                *extra,
            )
            points.append(Point(f"{name}-{seed}", overrides, {"seed": seed}, f"{name} {seed}"))
    return points


def measure(points: list[Point], out: Path, one_per_run: bool) -> dict:
    """Run the grid one way; its wall time, the rounds' seconds and round 1's."""
    start = time.perf_counter()
    outcomes = run_grid("quickstart", points, out, runner=run_point if one_per_run else None)
    wall = time.perf_counter() - start
    if not all(outcome.ok for outcome in outcomes):
        raise RuntimeError(f"a run failed: {[o.error for o in outcomes if not o.ok]}")
    rounds, first = 0.0, []
    for point in points:
        lines = (out / point.name / "metrics.jsonl").read_text().splitlines()
        seconds = [json.loads(line)["seconds"] for line in lines]
        rounds += sum(seconds)
        first.append(seconds[0])
    return {
        "wall": wall,
        "rounds": rounds,
        "fixed": (wall - rounds) / len(points),
        "first_round": statistics.median(first),
        "first_round_first_run": first[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds (4 runs)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backbone", default="miniature")
    parser.add_argument(
        "--override", action="append", default=[], help="KEY=VALUE every run adds (repeatable)"
    )
    args = parser.parse_args()
    seeds = 2 if args.quick else args.seeds
    points = grid(seeds, args.rounds, args.backbone, args.override)
    print(f"machine: {machine_line()}")
    print(
        f"grid: quickstart, {len(points)} runs of {args.rounds} round(s), {args.backbone} "
        f"{' '.join(args.override)}"
    )
    with tempfile.TemporaryDirectory(prefix="fedprompt-grid-") as tmp:
        measure(points[:2], Path(tmp, "warm-cache"), one_per_run=False)  # fills the caches
        old = measure(points, Path(tmp, "old"), one_per_run=True)
        new = measure(points, Path(tmp, "new"), one_per_run=False)
    for name, result in (("one simulation per run", old), ("one session for the grid", new)):
        print(
            f"{name}: wall {result['wall']:.1f} s, rounds {result['rounds']:.1f} s, fixed cost "
            f"per run {result['fixed']:.2f} s; round 1 median {result['first_round']:.2f} s "
            f"(first run's {result['first_round_first_run']:.2f} s)"
        )
    print(
        f"fixed cost per run: x{old['fixed'] / new['fixed']:.1f} lower in one session "
        f"({new['fixed']:.2f} s against {old['fixed']:.2f} s; target <= 3 s)"
    )


if __name__ == "__main__":
    main()
