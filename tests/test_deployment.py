"""Deployment: real processes on loopback, through the scripts in server/ and sites/.

A SuperLink with TLS and SuperNode authentication, three hospitals' SuperNodes each reading its
own data folder, `flwr run` of two rounds on the miniature backbone. A SuperNode whose key was
never registered is refused; one hospital's SuperNode is killed (SIGKILL, as a power cut) once
round 1 is recorded, and the run completes with the other two, round 2's line naming the
missing site.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict
from sites_on_disk import write_site

from fedprompt.federation.orchestration import wait_for_sites
from fedprompt.federation.run_config import default_run_config

ROOT = Path(__file__).parents[1]
SERVER = ROOT / "server"
SITES = ROOT / "sites"
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.5)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Processes:
    """Background processes, each in its own process group, stopped by PID at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("w") as log:
            process = subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """The whole group at once, without warning: the SuperNode and its ClientApp."""
        os.killpg(self.started[name].pid, signal.SIGKILL)
        self.started[name].wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_the_deployment_app_declares_the_bridge_keys_and_installs_nothing():
    with (SERVER / "app/pyproject.toml").open("rb") as handle:
        data = tomllib.load(handle)
    assert data["project"]["dependencies"] == []
    assert data["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedprompt.federation.server_app:app",
        "clientapp": "fedprompt.federation.client_app:app",
    }
    assert flatten_dict(data["tool"]["flwr"]["app"]["config"]) == default_run_config("")


class Connected:
    """A grid that reports a fixed number of connected nodes."""

    def __init__(self, count):
        self.count = count

    def get_node_ids(self):
        return list(range(self.count))


def test_a_deployed_run_starts_with_the_sites_present_after_the_timeout():
    assert wait_for_sites(Connected(3), 3, timeout=0, min_sites=2) == 3
    assert wait_for_sites(Connected(4), 3, timeout=0, min_sites=2) == 4  # all take part
    assert wait_for_sites(Connected(2), 3, timeout=0, min_sites=2) == 2
    with pytest.raises(RuntimeError, match="Only 1 of the 3 sites connected"):
        wait_for_sites(Connected(1), 3, timeout=0, min_sites=2)


def test_a_simulation_needs_exactly_one_node_per_site():
    assert wait_for_sites(Connected(3), 3, timeout=0) == 3
    with pytest.raises(RuntimeError, match="num-supernodes=3"):
        wait_for_sites(Connected(4), 3, timeout=0)


@pytest.mark.slow
@pytest.mark.e2e
def test_tls_node_auth_and_a_site_lost_mid_run(tmp_path, miniature_backbone, backbone_cache_dir):
    started = time.monotonic()
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FEDPROMPT_CACHE": str(backbone_cache_dir),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Processes(logs, env)
    port = _free_port()
    superlink = f"127.0.0.1:{port}"
    certs = tmp_path / "certs"
    results = tmp_path / "results"
    try:
        # The coordinating centre: certificates for the address sites use, then the SuperLink.
        _run(
            [str(SERVER / "make-certificates.sh"), "--out", str(certs), "--host", "127.0.0.1"], env
        )
        processes.start(
            "superlink",
            [
                str(SERVER / "start-superlink.sh"),
                *("--certs", str(certs), "--host", "127.0.0.1", "--port", str(port)),
                *("--state", str(tmp_path / "state")),
            ],
        )
        _wait_until(lambda: _port_open(port), 60, "the SuperLink opening its port")

        # Each hospital: its own images, site config and key; the centre registers the key.
        configs = {}
        for index, name in enumerate([*HOSPITALS, "intruder"]):
            configs[name] = write_site(tmp_path / "sites", name, seed=index)
            keys = configs[name].parent / "keys"
            _run([str(SITES / "make-site-key.sh"), "--name", name, "--out", str(keys)], env)
            if name != "intruder":
                _run(
                    [
                        str(SERVER / "register-site.sh"),
                        *("--name", name, "--key", str(keys / f"{name}.pub")),
                        *("--superlink", superlink, "--ca", str(certs / "ca.pem")),
                    ],
                    env,
                )
        for name in [*HOSPITALS, "intruder"]:
            check = [] if name == "hospital-a" else ["--skip-check"]
            processes.start(
                name,
                [
                    str(SITES / "start-supernode.sh"),
                    *("--config", str(configs[name]), "--superlink", superlink),
                    *("--ca", str(certs / "ca.pem")),
                    *("--key", str(configs[name].parent / "keys" / name)),
                    *("--port", str(_free_port()), *check),
                ],
            )

        # A SuperNode whose key was never registered is turned away.
        intruder = processes.started["intruder"]
        intruder.wait(timeout=120)
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in processes.log("intruder")

        run = processes.start(
            "run",
            [
                str(SERVER / "start-run.sh"),
                *("--superlink", superlink, "--ca", str(certs / "ca.pem")),
                *("--output", str(results), "--sites", "3", "--rounds", "2"),
                *("--", "train.local_epochs=1", "federation.connect_timeout=90"),
            ],
        )
        metrics = results / "metrics.jsonl"
        _wait_until(
            lambda: (
                (metrics.exists() and metrics.read_text().count("\n") >= 1)
                or run.poll() is not None
            ),
            400,
            "round 1",
        )
        processes.kill("hospital-c")
        run.wait(timeout=400)
        assert run.returncode == 0, processes.log("run")[-4000:]
    finally:
        processes.stop_all()
        print(f"deployment test: {time.monotonic() - started:.0f} s wall time")

    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    first, second = lines
    assert sorted(first["sites"]) == HOSPITALS and first["missing"] == {}
    assert first["num_trained"] == 3
    assert second["num_trained"] == 2
    assert list(second["missing"]) == ["hospital-c"], second["missing"]
    assert second["missing"]["hospital-c"]  # the reason: unavailable, no reply, not connected
    for name in ("hospital-a", "hospital-b"):
        assert second["sites"][name]["train_loss"] > 0
        assert second["sites"][name]["num_test"] == 8  # all of the site's own test images
    summary = json.loads((results / "summary.json").read_text())
    assert summary["mode"] == "deployment" and summary["final"]["source"] == "federated"
    assert set(summary["final"]["per_site"]) == {"hospital-a", "hospital-b"}
    assert "round 2/2" in processes.log("run") and "missing hospital-c" in processes.log("run")

    # Each site keeps its own log of the updates it sent.
    def rounds_sent(name):
        releases = json.loads((configs[name].parent / "state/releases.json").read_text())
        return [entry["round"] for entry in releases["releases"]]

    assert rounds_sent("hospital-a") == rounds_sent("hospital-b") == [1, 2]
    assert rounds_sent("hospital-c")[0] == 1
    assert "OK: every image is readable" in processes.log("hospital-a")
