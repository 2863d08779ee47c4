"""Run an experiment through Flower's simulation engine: a private SuperLink plus ``flwr run``.

``fedprompt simulate`` uses the very ServerApp and ClientApp that ``flwr run simulations/<app>``
uses; this module only supplies what a person would otherwise type: a SuperLink on a free port,
the app folder, the run-config and the number of SuperNodes. The SuperLink and everything it
starts end with the process that started them, however it ends (see ``process_guard``).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import tomli_w
from omegaconf import DictConfig

from fedprompt.config import ConfigError
from fedprompt.federation.grid_session import GridPlan
from fedprompt.federation.process_guard import descendants
from fedprompt.federation.run_config import (
    PLAN_KEY,
    default_run_config,
    overrides_to_run_config,
)
from fedprompt.terminal import INTERRUPTED, FlowerOutput

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedprompt-simulate"
version = "0.1.0"
description = "fedprompt simulate: one experiment on a private local SuperLink"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedprompt"

[tool.flwr.app.components]
serverapp = "fedprompt.federation.server_app:app"
clientapp = "fedprompt.federation.client_app:app"

"""

QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

# Ray warns at every ray.init that a future version will stop hiding GPUs from actors that ask
# for none; its suggested switch would change today's behaviour, so the notice alone is dropped.
RAY_NOTICE_FILTER = "ignore::FutureWarning:ray._private.worker"

# Ray on Linux takes the machine's network address as its node IP, and then its GCS, raylet,
# object manager, runtime-env agent and every worker listen on all interfaces (the dashboard
# agent and its metrics port too, where ray[default] is installed). With this variable at 0,
# ray._private.services.get_node_ip_address answers the loopback address, as it does for a
# one-machine Ray on macOS and Windows, and each of those servers binds 127.0.0.1 only. The
# simulation's ray.init gets no node IP from Flower, so the environment is the only way in.
# RAY_ADDRESS=local: a fresh Ray for this simulation. Without it, ray.init joins the cluster that
# `ray start` last recorded in /tmp/ray/ray_current_cluster: someone's cluster (the private
# simulation would run on it), or a dead one left behind (ray.init then hangs).
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    """A Flower command from this environment's bin folder, so the right installation runs."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"The Flower command {name} is not installed; run pip install -e .")
    return found


def write_app(directory: Path, experiment: str) -> Path:
    """A Flower app folder whose defaults are the bridge's keys for ``experiment``.

    It also declares a session's plan key (``grid_session.PLAN_KEY``), empty outside a session.
    """
    directory.mkdir(parents=True, exist_ok=True)
    defaults = default_run_config(experiment) | {PLAN_KEY: ""}
    config = tomli_w.dumps({"tool": {"flwr": {"app": {"config": defaults}}}})
    (directory / "pyproject.toml").write_text(APP_PYPROJECT + config, encoding="utf-8")
    return directory


def _wait_for_port(
    port: int, process: subprocess.Popen, log_path: Path, since: int, timeout: float = 60.0
) -> None:
    """Until ``process`` listens on ``port``; ``log_path`` from byte ``since`` is what it printed.

    Raises:
        PortTaken: The process ended at start saying its port was in use (another process took
            it after it was found free).
        RuntimeError: The process ended at start for another reason, which a new port would not
            mend; the message quotes its last words.
        TimeoutError: Nothing listened within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with log_path.open(encoding="utf-8", errors="replace") as log:
                log.seek(since)
                said = log.read()
            stopped = f"flower-superlink exited with code {process.returncode} at start"
            if "already in use" in said.lower():
                raise PortTaken(f"{stopped}: its port was in use.")
            worded = [line for line in said.splitlines() if any(c.isalnum() for c in line)]
            last = worded[-1].strip(" │") if worded else "nothing"  # │: a rich panel's edge
            raise RuntimeError(f"{stopped}, saying: {last.rstrip('.')}; see {log_path}.")
        if _listens(process.pid, port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not open port {port} within {timeout:.0f} s.")


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of the loopback or wildcard TCP listeners on ``port`` (from ``/proc``)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _listens(pid: int, port: int) -> bool:
    """Whether ``pid`` or a process it started listens on ``port``, not some other process.

    Where ``/proc`` is missing, whether anything answers on the port.
    """
    if not Path("/proc/net/tcp").exists():
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for member in {pid} | descendants(pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{member}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return True
    return False


def _descendant_groups(pid: int) -> set[int]:
    """Process groups of ``pid``'s descendants (from ``/proc``; empty where there is none).

    The SuperLink starts the SuperExec in a session of its own, and Ray's daemons run in the
    SuperExec's group; a Ray agent outlives its parents unless its group is stopped too.
    """
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), int(fields[2])))
    groups: set[int] = set()
    stack = [pid]
    while stack:
        for child, group in children.get(stack.pop(), []):
            groups.add(group)
            stack.append(child)
    return groups - {os.getpgrp()}


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _stop(process: subprocess.Popen) -> None:
    """Stop a process group started with ``start_new_session`` and every group it started."""
    groups = _descendant_groups(process.pid)
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
    for group in groups:
        _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while groups and time.monotonic() < deadline:
        groups = {g for g in groups if _group_alive(g)}
        time.sleep(0.2)
    for group in groups:
        _signal_group(group, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@contextlib.contextmanager
def private_superlink(workdir: Path, ray_address: str | None = None) -> Iterator[dict[str, str]]:
    """A SuperLink in simulation mode on a free port, and the environment that targets it.

    ``flwr run <app> fedprompt`` run with the yielded environment reaches this SuperLink; it and
    every process it started are stopped on exit, and killed at once should this process die
    first (``process_guard``). It and everything it starts (the SuperExec, flwr-simulation,
    Ray's daemons and actors) listen on the loopback interface only.

    With ``ray_address`` the simulation joins that running Ray cluster instead of starting its
    own Ray (``ray.init`` reads ``RAY_ADDRESS``): its actors, and so the sites, spread over the
    cluster's nodes. The cluster is the operator's; its nodes listen as they were started.
    """
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), RAY_NOTICE_FILTER]))
    env = {
        **os.environ,
        **QUIET_FLOWER_ENV,
        **({"RAY_ADDRESS": ray_address} if ray_address else LOOPBACK_RAY_ENV),
        "FLWR_HOME": str(home),
        "PATH": path,
        "PYTHONWARNINGS": warnings,
    }
    with (workdir / "superlink.log").open("w") as log_file:
        superlink, port = _start_superlink(env, log_file)
        connection = {"address": f"127.0.0.1:{port}", "insecure": True}
        (home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": "fedprompt", "fedprompt": connection}}),
            encoding="utf-8",
        )
        try:
            yield env
        finally:
            _stop(superlink)
            if superlink.stdin:
                superlink.stdin.close()


SUPERLINK_START_TRIES = 5


class PortTaken(RuntimeError):
    """The SuperLink could not have the port it was given: another process took it first."""


def _start_superlink(env: dict[str, str], log_file: IO[str]) -> tuple[subprocess.Popen, int]:
    """A SuperLink on a free loopback port, and that port.

    A port found free can be taken by another process before the SuperLink binds it; the
    SuperLink then exits at start saying so, and it is started again on another port. Any other
    exit at start is a fault a new port would not mend.

    Raises:
        RuntimeError: It stopped at start for another reason than a taken port, or it did not
            start within ``SUPERLINK_START_TRIES`` ports.
    """
    log_path = Path(log_file.name)
    for _ in range(SUPERLINK_START_TRIES):
        port = _free_port()
        log_file.flush()
        since = log_path.stat().st_size
        # The guard's stdin is the lifeline: only this process holds the pipe's write end.
        superlink = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedprompt.federation.process_guard",
                _tool("flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
                "--database",
                ":flwr-in-memory:",
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for_port(port, superlink, log_path, since)
            return superlink, port
        except RuntimeError as stopped:  # PortTaken is one: only that one is tried again
            _stop(superlink)
            if superlink.stdin:
                superlink.stdin.close()
            if not isinstance(stopped, PortTaken):
                raise
    raise RuntimeError(
        f"flower-superlink did not start on any of {SUPERLINK_START_TRIES} free ports; see "
        f"{log_file.name}."
    )


def _check_ray_head(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``federation.ray_address`` where no Ray head answers (else round 1 waits forever).

    Raises:
        ConfigError: Nothing accepts a connection at ``address`` within ``timeout``.
    """
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError:
        raise ConfigError(
            f"federation.ray_address={address}: no Ray cluster answers there; start its head "
            f"with `ray start --head --port {port}` (and its workers with `ray start --address "
            f"{address}`), or set federation.ray_address=null."
        ) from None


def ray_address_of(cfg: DictConfig) -> str | None:
    """``federation.ray_address``: a running Ray cluster to simulate on (None: a private Ray)."""
    address = cfg.federation.get("ray_address")
    return str(address) if address else None


def flwr_run_command(app_dir: Path, run_config: Path, cfg: DictConfig) -> list[str]:
    """``flwr run`` with one SuperNode per site and each site's resources from the config."""
    federation = (
        f"num-supernodes={int(cfg.federation.num_sites)} "
        f"client-resources-num-cpus={cfg.federation.client_cpus} "
        f"client-resources-num-gpus={cfg.federation.client_gpus}"
    )
    return [
        _tool("flwr"),
        "run",
        str(app_dir),
        "fedprompt",
        "--run-config",
        str(run_config),
        "--federation-config",
        federation,
        "--stream",
    ]


def write_run_config(path: Path, run_config: dict[str, object]) -> Path:
    """A TOML run-config file, which spares any shell quoting of values."""
    path.write_text(tomli_w.dumps(run_config), encoding="utf-8")
    return path


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler ending the job, ``kill``) stops the run as Ctrl-C does.

    The SuperLink and Ray run in sessions of their own, so only this process can stop them; a
    plain SIGTERM would end it without running the clean-up.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stream(command: list[str], env: dict[str, str], output: FlowerOutput) -> int:
    """Run ``command``, handing everything it prints to ``output`` as it comes."""
    # Unbuffered, or flwr run would hold its lines back in a pipe until a block fills.
    process = subprocess.Popen(
        command,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        with process.stdout:
            while True:
                ready, _, _ = select.select([process.stdout], [], [], 1.0)
                if ready:
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    output.feed(decoder.decode(chunk))
                output.tick()
        output.feed(decoder.decode(b"", final=True))
        return process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        output.close()


def check_before_flower(cfg: DictConfig) -> None:
    """What a run needs that can be checked in this process, so it fails before Flower starts.

    The Ray cluster where one is named, the dataset's index (and the unseen datasets'), the
    authors' descriptions where asked for, each simulated site's training set against the
    privacy settings, and Flower's own checks of the SecAgg+ parameters. ``check_config`` has
    checked the keys themselves.

    Raises:
        ConfigError, DataError, DescriptionsError: The first problem, in one sentence.
    """
    from fedprompt.config_schema import check_site_sizes
    from fedprompt.data.sites import load_splits, with_dataset
    from fedprompt.federation.orchestration import secagg_settings
    from fedprompt.site_rounds import site_train_sizes
    from fedprompt.text.descriptions import AUTHORS, author_descriptions_file

    address = ray_address_of(cfg)
    if address is not None:
        _check_ray_head(address)
    splits = load_splits(cfg)
    if cfg.method.get("descriptions") == AUTHORS:
        author_descriptions_file(splits.classnames)
    for name in cfg.evaluation.get("unseen_datasets") or []:
        load_splits(with_dataset(cfg, str(name)))
    if cfg.federation.mode == "simulation":
        check_site_sizes(cfg, site_train_sizes(cfg))
    secagg_settings(cfg)


def simulate_plan(plan: GridPlan, plan_file: Path, flower_log: Path) -> int:
    """Every point of ``plan`` in one simulation (``grid_session``); ``flwr run``'s exit code.

    One SuperLink, one ``flwr run`` with as many SuperNodes as the largest point has sites, and
    the resources of that point; Flower's whole output goes to ``flower_log``. Each point writes
    its own results folder, as a single run does.
    """
    configs = [plan.config(index) for index in range(len(plan.points))]
    largest = max(configs, key=lambda cfg: int(cfg.federation.num_sites))
    plan.save(plan_file)
    with tempfile.TemporaryDirectory(prefix="fedprompt-session-") as tmp:
        workdir = Path(tmp)
        app_dir = write_app(workdir / "app", plan.experiment)
        run_config = write_run_config(
            workdir / "run-config.toml",
            {"experiment": plan.experiment, PLAN_KEY: str(plan_file.resolve())},
        )
        flower_log.parent.mkdir(parents=True, exist_ok=True)
        address = ray_address_of(largest)
        with _terminate_as_interrupt(), private_superlink(workdir, address) as env:
            command = flwr_run_command(app_dir, run_config, largest)
            with flower_log.open("a", encoding="utf-8") as log:
                try:
                    return subprocess.run(
                        command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
                    ).returncode
                except KeyboardInterrupt:
                    return INTERRUPTED


def simulate(
    experiment: str,
    overrides: Sequence[str],
    cfg: DictConfig,
    *,
    flower_log: Path | None = None,
    verbose: bool = False,
) -> int:
    """Run the experiment on a private local SuperLink; returns ``flwr run``'s exit code.

    Args:
        experiment: The experiment file the overrides apply to.
        overrides: Hydra overrides, turned into Flower's run-config.
        cfg: The composed config (the number of sites and their resources).
        flower_log: Where Flower's whole output goes (appended); the terminal then shows only
            fedprompt's lines (``FlowerOutput``). None leaves Flower's output on this process's
            stdout, where a grid of runs redirects it.
        verbose: With ``flower_log``, also show all of Flower's output on the terminal.
    """
    with tempfile.TemporaryDirectory(prefix="fedprompt-sim-") as tmp:
        workdir = Path(tmp)
        app_dir = write_app(workdir / "app", experiment)
        run_config = write_run_config(
            workdir / "run-config.toml", overrides_to_run_config(experiment, overrides)
        )
        try:
            address = ray_address_of(cfg)
            with _terminate_as_interrupt(), private_superlink(workdir, address) as env:
                command = flwr_run_command(app_dir, run_config, cfg)
                if flower_log is None:
                    return subprocess.run(command, env=env, check=False).returncode
                flower_log.parent.mkdir(parents=True, exist_ok=True)
                sites, rounds = int(cfg.federation.num_sites), int(cfg.federation.rounds)
                print(
                    f"fedprompt: {experiment} on Flower's simulation engine, {sites} site"
                    f"{'s' * (sites != 1)}, {rounds} round{'s' * (rounds != 1)}; "
                    f"Flower's log: {flower_log}",
                    flush=True,
                )
                with flower_log.open("a", encoding="utf-8") as log:
                    output = FlowerOutput(log, sys.stdout, verbose=verbose)
                    return _stream(command, env, output)
        except KeyboardInterrupt:
            print(
                "fedprompt: interrupted; the local SuperLink and its simulation are stopped. "
                f"Continue from the last completed round with resume={cfg.output_dir}.",
                file=sys.stderr,
            )
            return INTERRUPTED
