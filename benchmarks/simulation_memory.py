"""Peak resident memory of whole ``fedprompt simulate`` runs with 5, 20 and 50 sites.

Usage: python benchmarks/simulation_memory.py [--quick] [--sites 5 20 50] [--rounds 2]
       [--images-per-site 2] [--backbone biomedclip-random] [--client-cpus 1] [--interval 0.25]
       [--personalization none promptfolio]

With several ``--personalization`` schemes, each number of sites runs once per scheme and the
peaks are compared with the first scheme's at the same number of sites (a personalized prompt
per site must not grow the memory with the sites).

Each run is the real command (``fedprompt simulate quickstart ...``): the fedprompt and ``flwr run``
CLIs, a private SuperLink with its SuperExec, the simulation process (which also runs the
ServerApp), Ray's own processes and the Ray actors that run the ClientApp, on a generated set with
``--images-per-site`` training and as many test images per site (so the work per site is the
same whatever the number of sites), two rounds, central evaluation on. A sampler thread walks the
process tree from the command every ``--interval`` seconds (plus any process that inherited this
run's marker variable, in case one was re-parented) and sums VmRSS (and PSS, which counts shared
pages once) over all of them; the peak of that sum is reported with its share per process kind.
The image-tower batch is fixed (``features.batch_size`` 16), so that a larger test split does
not mean larger activations.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from common import machine_line

_MARKER = "FEDPROMPT_BENCH_RUN"
_ROLES = (
    ("ray::ClientAppActor", "Ray actors"),
    ("flower-superlink", "SuperLink"),
    ("flower-superexec", "SuperExec"),
    ("flwr-simulation", "simulation+ServerApp"),
    ("flwr run", "flwr run"),
    ("fedprompt simulate", "fedprompt CLI"),
    ("ray", "Ray system"),
)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _field_kb(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def _role(pid: int) -> str:
    """What a process of the run is, from its command line."""
    command = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
    for needle, role in _ROLES:
        if needle in command:
            return role
    return "other"


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process tree until stopped; keeps the peak.

    Args:
        root: PID of the command.
        marker: ``NAME=value`` in the environment of every process of this run.
        interval: Seconds between samples.
    """

    def __init__(self, root: int, marker: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.marker, self.interval = root, marker.encode(), interval
        self.peak_rss_kb = self.peak_pss_kb = 0
        self.peak_roles: dict[str, int] = {}
        self.actors: set[int] = set()
        self._stop_event = threading.Event()

    def _members(self) -> set[int]:
        parents = _parents()
        children: dict[int, list[int]] = defaultdict(list)
        for pid, parent in parents.items():
            children[parent].append(pid)
        members, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid not in members:
                members.add(pid)
                todo.extend(children.get(pid, []))
        for pid in parents:
            if pid not in members:
                try:
                    with open(f"/proc/{pid}/environ", "rb") as file:
                        if self.marker in file.read():
                            members.add(pid)
                except OSError:
                    continue
        return members

    def sample(self) -> None:
        """One walk over the tree."""
        rss = pss = 0
        roles: dict[str, int] = defaultdict(int)
        for pid in self._members():
            kb = _field_kb(_read(f"/proc/{pid}/status"), "VmRSS:")
            rss += kb
            pss += _field_kb(_read(f"/proc/{pid}/smaps_rollup"), "Pss:")
            role = _role(pid)
            roles[role] += kb
            if role == "Ray actors" and kb > 100_000:
                self.actors.add(pid)
        if rss > self.peak_rss_kb:
            self.peak_rss_kb, self.peak_roles = rss, dict(roles)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        """Take a last sample and end the thread."""
        self._stop_event.set()
        self.join()


def run_simulation(
    sites: int, args: argparse.Namespace, workdir: Path, personalization: str = "none"
) -> dict:
    """One ``fedprompt simulate`` run, sampled; returns its peak memory and wall time."""
    per_class = math.ceil(args.images_per_site * sites / 4)
    overrides = [
        f"backbone={args.backbone}",
        "dataset=synthetic",
        f"dataset.root={workdir / 'data'}",  # made beforehand: an absent root means a stand-in
        f"dataset.train_per_class={per_class}",
        "dataset.val_per_class=0",
        f"dataset.test_per_class={per_class}",
        f"federation.num_sites={sites}",
        f"federation.rounds={args.rounds}",
        f"federation.client_cpus={args.client_cpus}",
        "train.local_epochs=1",
        "features.batch_size=16",
        f"features.cache_dir={workdir / 'features'}",
        f"output_dir={workdir / 'run'}",
        f"personalization={personalization}",
    ]
    (workdir / "data").mkdir()
    command = [str(Path(sys.executable).with_name("fedprompt")), "simulate", "quickstart"]
    marker = f"{_MARKER}={uuid.uuid4().hex}"
    env = {**os.environ, _MARKER: marker.split("=", 1)[1]}
    log = workdir / "simulate.log"
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            command + overrides, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        sampler = TreeSampler(process.pid, marker, args.interval)
        sampler.start()
        code = process.wait()
        sampler.stop()
    wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"fedprompt simulate with {sites} sites failed ({code}):\n{tail}")
    return {
        "sites": sites,
        "personalization": personalization,
        "rss_gb": sampler.peak_rss_kb / 2**20,
        "pss_gb": sampler.peak_pss_kb / 2**20,
        "roles": sampler.peak_roles,
        "actors": len(sampler.actors),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 and 4 sites, 1 round")
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images-per-site", type=int, default=2)
    parser.add_argument("--backbone", default="biomedclip-random")
    parser.add_argument("--client-cpus", type=float, default=1)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--personalization", nargs="+", default=["none"])
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds = [2, 4], 1

    print(f"machine: {machine_line()}")
    print(
        f"fedprompt simulate quickstart backbone={args.backbone} dataset=synthetic, "
        f"{args.images_per_site} train + {args.images_per_site} test images per site, "
        f"{args.rounds} rounds, client_cpus={args.client_cpus:g}"
    )
    results = []
    for sites in args.sites:
        for scheme in args.personalization:
            with tempfile.TemporaryDirectory(prefix=f"fedprompt-mem-{sites}-") as tmp:
                results.append(run_simulation(sites, args, Path(tmp), scheme))
            last = results[-1]
            roles = ", ".join(
                f"{role} {kb / 2**20:.2f}" for role, kb in sorted(last["roles"].items()) if kb
            )
            print(
                f"  {sites:3d} sites, personalization={scheme}: peak RSS sum "
                f"{last['rss_gb']:.2f} GB (PSS {last['pss_gb']:.2f} GB), {last['actors']} Ray "
                f"actors, {last['wall']:.0f} s; at the peak, GB: {roles}",
                flush=True,
            )
    first = args.personalization[0]
    base = next(r for r in results if r["personalization"] == first)
    for result in results:
        if result["personalization"] == first and result is not base:
            rss, pss = result["rss_gb"] / base["rss_gb"], result["pss_gb"] / base["pss_gb"]
            print(
                f"{result['sites']} vs {base['sites']} sites ({first}): RSS x{rss:.2f}, "
                f"PSS x{pss:.2f} (target <= 1.2)"
            )
    for result in results:
        if result["personalization"] != first:
            same = next(
                r
                for r in results
                if r["sites"] == result["sites"] and r["personalization"] == first
            )
            rss, pss = result["rss_gb"] / same["rss_gb"], result["pss_gb"] / same["pss_gb"]
            print(
                f"{result['sites']} sites, {result['personalization']} vs {first}: "
                f"RSS x{rss:.2f}, PSS x{pss:.2f} (target <= 1.2)"
            )

if __name__ == "__main__":
    main()
