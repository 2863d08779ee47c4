"""A private SuperLink: stopping it stops every process it started, Ray's daemons included, and
none of those processes listens beyond the loopback interface."""

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import raise_if_taken, start_on_free_ports

from fedprompt.config import ConfigError, compose_config
from fedprompt.federation import local_simulation
from fedprompt.federation.local_simulation import _group_alive, _stop, _terminate_as_interrupt

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A parent that starts a grandchild in a session of its own (as the SuperLink starts the
# SuperExec, whose group holds Ray), prints its pid, and waits.
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_ends_the_group_and_the_groups_it_started():
    parent = subprocess.Popen(
        [sys.executable, "-c", SPAWNER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    grandchild = int(parent.stdout.readline())
    assert _group_alive(grandchild)
    _stop(parent)
    deadline = time.monotonic() + 10
    while _group_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert parent.poll() is not None
    assert not _group_alive(grandchild)


def test_sigterm_becomes_an_interrupt_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_private_superlink_gets_rays_loopback_setting(monkeypatch, tmp_path):
    started: list[dict[str, str]] = []
    popen = subprocess.Popen

    def fake_popen(command, *, env, **kwargs):  # a SuperLink that ends at once
        started.append(env)
        return popen([sys.executable, "-c", "pass"], start_new_session=True)

    with monkeypatch.context() as patch:
        patch.setattr(local_simulation.subprocess, "Popen", fake_popen)
        patch.setattr(local_simulation, "_wait_for_port", lambda port, process, *log: None)
        with local_simulation.private_superlink(tmp_path) as env:
            pass
    assert started == [env]
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_ADDRESS"] == "local"  # never a cluster `ray start` left on this machine
    # Ray itself, started with that environment, takes the loopback address as its node IP.
    ask = "from ray._private.services import get_node_ip_address; print(get_node_ip_address())"
    done = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "127.0.0.1", done.stderr[-2000:]


def test_a_port_taken_before_the_superlink_binds_it_is_replaced(monkeypatch, tmp_path):
    # Another process takes the first port found free (the race a pick-close-rebind leaves).
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    free = local_simulation._free_port
    monkeypatch.setattr(local_simulation, "_free_port", lambda: next(ports, None) or free())
    with taken, local_simulation.private_superlink(tmp_path) as env:
        config = (Path(env["FLWR_HOME"]) / "config.toml").read_text()
        port = int(config.split("127.0.0.1:")[1].split('"')[0])
        assert port != taken.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).with_name("flwr")), "ls"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr  # the SuperLink answers there


def test_a_superlink_that_stops_at_start_for_another_reason_is_reported_not_retried(
    monkeypatch, tmp_path
):
    # `flwr` rejects flower-superlink's options: a real process that exits at once, port unused.
    monkeypatch.setattr(
        local_simulation, "_tool", lambda name: str(Path(sys.executable).parent / "flwr")
    )
    picked = []
    free = local_simulation._free_port
    monkeypatch.setattr(local_simulation, "_free_port", lambda: picked.append(free()) or picked[-1])
    with pytest.raises(RuntimeError) as caught, local_simulation.private_superlink(tmp_path):
        pass
    assert len(picked) == 1
    message = str(caught.value)
    # click words the option's refusal as its version likes; the sentence around it is ours.
    assert message.startswith("flower-superlink exited with code 2 at start, saying: No such ")
    assert "--insecure" in message and message.endswith(f"; see {tmp_path / 'superlink.log'}.")


def test_a_ray_address_where_no_cluster_answers_stops_before_flower():
    with socket.socket() as held:  # bound, never listening: nothing can answer there meanwhile
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        cfg = compose_config("quickstart", [f"federation.ray_address={address}"])
        with pytest.raises(ConfigError, match=f"federation.ray_address={address}: no Ray cluster"):
            local_simulation.check_before_flower(cfg)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _listening_tcp() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket, IPv4 and IPv6."""
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                address, port = fields[1].split(":")
                # The kernel prints each 32-bit word of the address in host (little-endian) order.
                raw = b"".join(
                    bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8)
                )
                found[int(fields[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def _listening_sockets_of_tree(root: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of each listening TCP socket held in ``root``'s tree."""
    listening = _listening_tcp()
    held = set()
    for pid in _descendants(root) | {root}:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # the process ended meanwhile, or a descriptor closed
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in listening:
                held.add((name, *listening[int(link[8:-1])]))
    return held


def _is_loopback(text: str) -> bool:
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket bound to 127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_simulation_listens_on_loopback_only(tmp_path):
    """Every listening socket of the SuperLink, flwr-simulation and Ray binds 127.0.0.1.

    The run also takes SecAgg+'s four exchanges through Flower's real messaging (serialised
    keys, shares and masked vectors), which the in-process tests cannot show.
    """
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "fedprompt.cli",
        "simulate",
        "quickstart",
        "federation.rounds=1",
        "federation.num_sites=3",
        "federation.secure_aggregation=true",
        "train.local_epochs=1",
        f"output_dir={out}",
    ]
    log = tmp_path / "simulate.log"
    seen: set[tuple[str, str, int]] = set()
    with log.open("w") as log_file:
        run = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 600
            while run.poll() is None and time.monotonic() < deadline:
                seen |= _listening_sockets_of_tree(run.pid)
                time.sleep(0.2)
        finally:
            if run.poll() is None:
                run.terminate()  # fedprompt simulate stops its SuperLink and Ray on SIGTERM
                run.wait(timeout=60)
    output = log.read_text()
    assert run.returncode == 0, output[-3000:]
    listed = "\n".join(f"{name} {address} {port}" for name, address, port in sorted(seen))
    names = {name for name, _, _ in seen}
    assert {"flower-superlin", "gcs_server", "raylet"} <= names, listed  # the check saw them
    beyond = [held for held in seen if not _is_loopback(held[1])]
    assert not beyond, f"listening beyond the loopback interface:\n{listed}"
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(line["aggregated"]) == ["site-0", "site-1", "site-2"], output[-3000:]
    assert json.loads((out / "summary.json").read_text())["secure_aggregation"] is True


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live process (None once it ended or is a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _name(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"


def _still_running(seen: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Of the processes seen, those still running (a reused pid has another start time)."""
    return {pid: name for pid, (name, start) in seen.items() if _start_time(pid) == start}


def _record_tree(root: int, seen: dict[int, tuple[str, str]]) -> None:
    """Record every live descendant of ``root`` under its current name.

    The name is refreshed on every pass: a child seen between its fork and its exec still
    bears its parent's name (Ray's raylet first shows as the driver's), so the first sight
    is not the name it runs under.
    """
    for pid in _descendants(root):
        if (start := _start_time(pid)) is not None:
            seen[pid] = (_name(pid), start)


def _metric_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_of_the_cli_ends_every_process_it_started(tmp_path):
    """SIGKILL gives the CLI no chance to clean up: the SuperLink, the SuperExec, flwr-simulation
    and Ray (each in a session of its own) must still end, and no round be written after it."""
    out = tmp_path / "results"
    metrics = out / "metrics.jsonl"
    # Rounds of a few seconds, so that round 2's line is far off when round 1's appears.
    command = [
        sys.executable,
        "-m",
        "fedprompt.cli",
        "simulate",
        "quickstart",
        "federation.rounds=20",
        "train.local_epochs=200",
        f"output_dir={out}",
    ]
    log = tmp_path / "simulate.log"
    seen: dict[int, tuple[str, str]] = {}
    with log.open("w") as log_file:
        cli = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while cli.poll() is None and time.monotonic() < deadline and not _metric_lines(metrics):
            _record_tree(cli.pid, seen)
            time.sleep(0.1)
        assert cli.poll() is None and _metric_lines(metrics), log.read_text()[-3000:]
        _record_tree(cli.pid, seen)
        names = {name for name, _ in seen.values()}
        assert {"flower-superlin", "flower-superexe", "gcs_server", "raylet"} <= names, names
        written = _metric_lines(metrics)
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
        deadline = time.monotonic() + 15
        while _still_running(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _still_running(seen)
        assert not left, f"still running 15 s after the kill: {sorted(left.values())}"
        assert _metric_lines(metrics) == written
    finally:
        for pid in _still_running(seen):  # what the code under test failed to stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# What the guard runs in the tests below: a child that starts a grandchild in a session of its
# own (as the SuperLink starts the SuperExec), prints the grandchild's pid, and waits.
def _guarded(tmp_path, lifetime: str) -> tuple[subprocess.Popen, int]:
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER.rsplit("time.sleep(600)", 1)[0] + f"time.sleep({lifetime})\n")
    guard = subprocess.Popen(
        [sys.executable, "-m", "fedprompt.federation.process_guard", sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return guard, int(guard.stdout.readline())


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return _start_time(pid) is None


def test_the_guard_kills_its_whole_tree_when_its_lifeline_closes(tmp_path):
    guard, grandchild = _guarded(tmp_path, "600")
    guard.stdin.close()  # what the kernel does when the CLI dies, however it dies
    assert guard.wait(timeout=10) == 128 + signal.SIGKILL
    assert _gone(grandchild, timeout=5)


def test_the_guard_ends_with_its_command_and_stops_what_it_left(tmp_path):
    guard, grandchild = _guarded(tmp_path, "0")
    assert guard.wait(timeout=20) == 0
    assert _gone(grandchild, timeout=1)
    guard.stdin.close()


def _ray(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), "start", "--block", *args]


def _cluster_nodes(address: str) -> int:
    """How many nodes of the Ray cluster at ``address`` are alive (asked in a child process)."""
    ask = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(sum(node['Alive'] for node in ray.nodes()))"
    )
    done = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, timeout=60)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


def _actor_hosts(node_groups: list[int]) -> set[int]:
    """Which of the nodes (by the process group of their ``ray start``) run a ClientApp actor."""
    hosts = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if not comm.read_text().startswith("ray::ClientApp"):
                continue
            parent = int((comm.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
            group = os.getpgid(parent)
        except (OSError, ValueError, IndexError):
            continue
        if group in node_groups:
            hosts.add(node_groups.index(group))
    return hosts


@pytest.mark.slow
@pytest.mark.e2e
def test_a_simulation_runs_on_a_two_node_ray_cluster(tmp_path):
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}

    def start_head(ports: list[int]) -> subprocess.Popen:
        """The head on ``ports[0]``; PortTaken where its GCS found the port taken."""
        log = tmp_path / f"head-{ports[0]}.log"
        with log.open("w") as output:
            head = subprocess.Popen(
                _ray("--head", "--port", str(ports[0]), "--include-dashboard", "false", *common),
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while _cluster_nodes(f"127.0.0.1:{ports[0]}") < 1 and time.monotonic() < deadline:
            if head.poll() is not None:
                raise_if_taken(log.read_text())  # Ray: "... `Address already in use` ..."
                break
            time.sleep(1)
        return head

    nodes = [start_on_free_ports(start_head)]
    port = int(nodes[0].args[nodes[0].args.index("--port") + 1])
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        nodes.append(
            subprocess.Popen(
                _ray("--address", address, *common),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        while _cluster_nodes(address) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert _cluster_nodes(address) == 2, "the two-node cluster did not come up"
        out = tmp_path / "run"
        command = [sys.executable, "-m", "fedprompt.cli", "simulate", "quickstart"]
        command += ["federation.rounds=1", f"federation.ray_address={address}", f"output_dir={out}"]
        simulation = subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        hosts = set()  # which cluster node's raylet started each ClientApp actor seen
        while simulation.poll() is None:
            hosts |= _actor_hosts([node.pid for node in nodes])
            time.sleep(0.2)
        printed = simulation.stdout.read()
        assert simulation.returncode == 0, printed[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and len(summary["final"]["per_site"]) == 3
        assert hosts == {0, 1}  # the sites ran on both nodes of the cluster
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=30)
        # `ray start` recorded this cluster as the machine's current one; it is gone now.
        record = Path("/tmp/ray/ray_current_cluster")
        if record.is_file() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()
