"""Deployment: real processes on loopback, through the scripts in server/ and sites/.

One centre for the module: a SuperLink with TLS and SuperNode authentication on 127.0.0.1, nginx
in front of it on the sites' port, and the centre's app signed with its key. Against it: an
outsider holding ca.pem tries the Control API through the sites' port (refused; an operator on
the centre's loopback may do the same); a second key under a registered name is refused; three
hospitals' SuperNodes, which run only apps the centre signed, refuse an unsigned app and one
signed by another key; a SuperNode whose key was never registered is turned away; and `flwr run`
of two rounds on the miniature backbone, where one hospital's SuperNode is killed (SIGKILL, as a
power cut) once round 1 is recorded and the run completes with the other two.

nginx, the SuperLink and the SuperNodes bind the ports they are given; a start that finds one
taken meanwhile is made again on fresh ports (tests/ports.py), which two tests check by holding
the first port tried.
"""

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict
from ports import FirstPortTaken, raise_if_taken, start_on_free_ports
from sites_on_disk import write_site

from fedprompt.federation.app_approval import SIGNATURE_FILE, build_fab
from fedprompt.federation.local_simulation import _listens
from fedprompt.federation.orchestration import wait_for_sites
from fedprompt.federation.run_config import default_run_config

ROOT = Path(__file__).parents[1]
SERVER = ROOT / "server"
SITES = ROOT / "sites"
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]
OPERATOR = "fedprompt-centre"  # the connection the server scripts write
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx-light)"
)
needs_ssh_keygen = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) is not installed"
)

PROBE = '''\
"""Asks every connected node once and logs what each answered."""
from logging import INFO

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def answer(msg, context):
    return Message(RecordDict({"probe": MetricRecord({"ran": 1})}), reply_to=msg)


@server.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    asked = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
    for reply in grid.send_and_receive(asked, timeout=120):
        outcome = reply.error.reason if reply.has_error() else "ran"
        log(INFO, "probe reply from %s: %s", reply.metadata.src_node_id, outcome)
'''


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.5)


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


def _attempt(command: list, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command], env=env, capture_output=True, text=True, timeout=300
    )


def _run(command: list, env: dict[str, str]) -> str:
    done = _attempt(command, env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _env(flwr_home: Path, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FEDPROMPT_CACHE": str(cache),
    }


def _probe_app(folder: Path, publisher: str) -> Path:
    folder.mkdir(parents=True)
    pyproject = (SERVER / "app/pyproject.toml").read_text()
    pyproject = pyproject.replace('name = "fedprompt-deployment"', 'name = "probe"')
    pyproject = pyproject.replace('publisher = "fedprompt"', f'publisher = "{publisher}"')
    pyproject = pyproject.replace("fedprompt.federation.server_app:app", "probe:server")
    (folder / "pyproject.toml").write_text(
        pyproject.replace("fedprompt.federation.client_app:app", "probe:client")
    )
    (folder / "probe.py").write_text(PROBE)
    return folder


@dataclass
class Centre:
    """The coordinating centre's machine, as the module's tests share it."""

    folder: Path
    env: dict[str, str]  # an operator on the centre's machine: the scripts' connection
    certs: Path
    public_port: int
    control_port: int
    processes: Processes
    app: Path  # the centre's app, signed
    trusted: Path  # what a hospital lists: the centre's signing key

    def scripts(self, script: str, *args) -> list:
        """A server/ script with the Control API address and the CA filled in first."""
        control = ["--control", f"127.0.0.1:{self.control_port}", "--ca", self.certs / "ca.pem"]
        return [SERVER / script, *control, *args]

    def flwr_json(self, *args) -> dict:
        return json.loads(_run(["flwr", *args, OPERATOR, "--format", "json"], self.env))

    def registered(self) -> dict[str, str]:
        nodes = self.flwr_json("supernode", "list")["nodes"]
        return {node["node-id"]: node["status"] for node in nodes}

    def run_count(self) -> int:
        return len(self.flwr_json("ls")["runs"])


def _https(port: int, ca: Path, method: str, path: str) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def _start_centre(processes: Processes, certs: Path, state: Path, ports: list[int]) -> list[int]:
    """server/start-superlink.sh on (sites' port, SuperLink's own), once nginx answers there.

    Raises:
        PortTaken: The centre stopped at start because one of the ports was in use.
    """
    public, control = ports
    superlink = processes.start(
        "superlink",
        [
            str(SERVER / "start-superlink.sh"),
            *("--certs", str(certs), "--host", "127.0.0.1", "--port", str(public)),
            *("--control-port", str(control), "--state", str(state)),
        ],
    )

    def answered() -> bool:
        if superlink.poll() is not None:
            return True
        try:  # a 403 under the federation's certificate: this centre's nginx, no other server
            return _https(public, certs / "ca.pem", "GET", "/")[0] == 403
        except OSError:
            return False

    _wait_until(answered, 90, "nginx answering on the sites' port")
    if superlink.poll() is not None:
        raise_if_taken(processes.log("superlink"))
        pytest.fail("the centre stopped at start:\n" + processes.log("superlink")[-4000:])
    return ports


def _start_supernode(processes: Processes, name: str, command: list, ports: list[int]) -> int:
    """sites/start-supernode.sh ``command`` with ``--port``, once its SuperNode listens there.

    Raises:
        PortTaken: The SuperNode stopped at start because the port was in use.
    """
    (port,) = ports
    process = processes.start(name, [*map(str, command), "--port", str(port)])
    _wait_until(
        lambda: process.poll() is not None or _listens(process.pid, port),
        180,
        f"{name}'s SuperNode listening on 127.0.0.1:{port}",
    )
    if process.poll() is not None:
        raise_if_taken(processes.log(name))
        pytest.fail(f"{name}'s SuperNode stopped at start:\n" + processes.log(name)[-4000:])
    return port


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("certs") / "certs"
    env = _env(folder.parent / "flwr-home", folder.parent)
    _run([SERVER / "make-certificates.sh", "--out", folder, "--host", "127.0.0.1"], env)
    return folder


@pytest.fixture(scope="module")
def centre(tmp_path_factory, certs, backbone_cache_dir):
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen (openssh-client) is not installed")
    folder = tmp_path_factory.mktemp("centre")
    env = _env(folder / "operator-flwr-home", backbone_cache_dir)
    # A SuperNode killed without warning leaves its private command folder here, not in /tmp.
    env["TMPDIR"] = str(folder / "tmp")
    (folder / "tmp").mkdir()
    (folder / "logs").mkdir()
    processes = Processes(folder / "logs", env)
    try:
        # nginx and the SuperLink bind their ports themselves (tests/ports.py).
        public, control = start_on_free_ports(
            lambda ports: _start_centre(processes, certs, folder / "state", ports), count=2
        )

        operator = Centre(
            folder, env, certs, public, control, processes, folder / "app", folder / "trusted-apps"
        )
        _run(operator.scripts("list-sites.sh"), env)  # writes the operator's connection

        # The centre's signing key, and its app signed with it; hospitals list the key.
        app = folder / "app"
        shutil.copytree(SERVER / "app", app, ignore=shutil.ignore_patterns(SIGNATURE_FILE))
        signed = _run(
            [
                SERVER / "sign-app.sh",
                *("--key", folder / "signing/centre", "--new-key", "--no-passphrase"),
                *("--app", app, "--out", folder / "fabs"),
            ],
            env,
        )
        operator.trusted.write_text(signed.splitlines()[-1] + "\n")
        yield operator
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def hospitals(centre, tmp_path_factory, miniature_backbone) -> dict[str, Path]:
    """Three registered hospitals' SuperNodes, online, running only the centre's signed apps."""
    folder = tmp_path_factory.mktemp("hospitals")
    configs = {}
    for index, name in enumerate(HOSPITALS):
        configs[name] = write_site(folder, name, seed=index)
        keys = configs[name].parent / "keys"
        _run([SITES / "make-site-key.sh", "--name", name, "--out", keys], centre.env)
        _run(
            centre.scripts("register-site.sh", "--name", name, "--key", keys / f"{name}.pub"),
            centre.env,
        )
    for name in HOSPITALS:
        _start_hospital(centre, configs[name], name)
    _wait_until(lambda: _all_online(centre), 180, "the three hospitals coming online")
    return configs


@pytest.fixture
def hospitals_started_again_after(centre, hospitals) -> dict[str, Path]:
    """The hospitals; those the test killed are started again after it, for the tests after it.

    The SuperLink takes a killed SuperNode back once it has marked it offline (two missed
    30-second heartbeats), so each waits for that first.
    """
    yield hospitals
    for name in HOSPITALS:
        if centre.processes.started[name].poll() is not None:
            _wait_until(lambda name=name: not _online(centre, name), 180, f"{name} offline")
            _start_hospital(centre, hospitals[name], name)
    _wait_until(lambda: _all_online(centre), 180, "the three hospitals online again")


def _start_hospital(centre, config: Path, name: str) -> None:
    check = [] if name == "hospital-a" else ["--skip-check"]
    command = [
        SITES / "start-supernode.sh",
        *("--config", config, "--superlink", f"127.0.0.1:{centre.public_port}"),
        *("--ca", centre.certs / "ca.pem", "--trusted-apps", centre.trusted),
        *("--key", config.parent / "keys" / name, *check),
    ]
    start_on_free_ports(lambda ports: _start_supernode(centre.processes, name, command, ports))


def _online(centre, name: str, listed: str | None = None) -> bool:
    listed = listed or _run(centre.scripts("list-sites.sh"), centre.env)
    return f"{name} " in listed and "online" in listed.split(name)[1].splitlines()[0]


def _all_online(centre) -> bool:
    listed = _run(centre.scripts("list-sites.sh"), centre.env)
    return all(_online(centre, name, listed) for name in HOSPITALS)


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


def test_the_centre_does_not_start_without_nginx(certs, tmp_path):
    done = _attempt(
        [SERVER / "start-superlink.sh", "--certs", certs, "--state", tmp_path],
        {**_env(tmp_path, tmp_path), "FEDPROMPT_NGINX": str(tmp_path / "no-nginx")},
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: nginx is not installed; install it (apt-get install nginx-light, or nginx) and "
        "run this again."
    )


def test_the_centre_does_not_start_with_a_certificate_nginx_cannot_check(certs, tmp_path):
    old = tmp_path / "old-certs"
    old.mkdir()
    shutil.copy(certs / "ca.pem", old / "ca.pem")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-keyout", old / "server.key", "-out", old / "server.pem", "-days", "1"),
            *("-subj", "/CN=fl.example.org", "-addext", "subjectAltName=DNS:fl.example.org"),
        ],
        check=True,
        capture_output=True,
    )
    done = _attempt(
        [SERVER / "start-superlink.sh", "--certs", old, "--state", tmp_path / "state"],
        {**_env(tmp_path, tmp_path), "FEDPROMPT_NGINX": "/bin/true"},
    )
    assert done.returncode == 2 and "lacks localhost and 127.0.0.1" in done.stderr


def test_a_site_does_not_start_without_a_list_of_trusted_app_signers(tmp_path):
    site = write_site(tmp_path, "hospital-a")
    start = [
        SITES / "start-supernode.sh",
        *("--config", site, "--superlink", "127.0.0.1:9", "--ca", site, "--key", site),
    ]
    env = _env(tmp_path, tmp_path)
    missing = _attempt(start, env)
    assert missing.returncode == 2 and "--trusted-apps" in missing.stderr
    (tmp_path / "empty").write_text("# nobody yet\n")
    empty = _attempt([*start, "--trusted-apps", tmp_path / "empty"], env)
    assert empty.returncode == 2
    assert "lists no app signer, so this site would run nothing" in empty.stderr

    # A site that cannot check signatures does not start either.
    (tmp_path / "trusted").write_text('centre@fedprompt namespaces="fedprompt-app" ssh-ed25519 A\n')
    tools = tmp_path / "no-ssh-keygen"
    tools.mkdir()
    for tool in ("bash", "grep"):
        (tools / tool).symlink_to(shutil.which(tool))
    blind = _attempt([*start, "--trusted-apps", tmp_path / "trusted"], {**env, "PATH": str(tools)})
    assert blind.returncode == 2 and "ssh-keygen is not installed" in blind.stderr


def test_the_centre_does_not_start_on_a_port_in_use(certs, tmp_path):
    env = {**_env(tmp_path, tmp_path), "FEDPROMPT_NGINX": "/bin/true"}
    start = [SERVER / "start-superlink.sh", "--certs", certs, "--state", tmp_path / "state"]
    same = _attempt([*start, "--port", "9092", "--control-port", "9092"], env)
    assert same.returncode == 2 and "--port and --control-port must differ" in same.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _attempt([*start, "--control-port", port], env)
    assert done.returncode == 1 and f"127.0.0.1:{port} is already in use" in done.stderr


@needs_nginx
@pytest.mark.slow
@pytest.mark.e2e
def test_the_centre_starts_again_when_a_port_was_taken_before_nginx_bound_it(certs, tmp_path):
    # Another process holds the first sites' port tried: the race picking a port leaves.
    (tmp_path / "logs").mkdir()
    processes = Processes(tmp_path / "logs", _env(tmp_path / "flwr-home", tmp_path))
    try:
        with FirstPortTaken() as choose:
            public, _ = start_on_free_ports(
                lambda ports: _start_centre(processes, certs, tmp_path / "state", ports),
                count=2,
                choose=choose,
            )
            assert len(choose.tried) == 2 and choose.tried[0][0] == choose.port != public
        # The first start's SuperLink stopped with its nginx, leaving nothing on its port.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", choose.tried[0][1])) != 0
    finally:
        processes.stop_all()


@needs_ssh_keygen
@pytest.mark.slow
@pytest.mark.e2e
def test_a_supernode_starts_again_when_its_port_was_taken_before_it_bound_it(certs, tmp_path):
    env = {**_env(tmp_path / "flwr-home", tmp_path), "TMPDIR": str(tmp_path)}
    config = write_site(tmp_path, "hospital-x")
    _run([SITES / "make-site-key.sh", "--name", "hospital-x", "--out", tmp_path / "keys"], env)
    public_key = " ".join((tmp_path / "keys/hospital-x.pub").read_text().split()[:2])
    trusted = tmp_path / "trusted-apps"
    trusted.write_text(f'centre@fedprompt namespaces="fedprompt-app" {public_key}\n')
    command = [
        SITES / "start-supernode.sh",
        # No SuperLink listens on port 1: the SuperNode keeps trying to reach it.
        *("--config", config, "--superlink", "127.0.0.1:1", "--ca", certs / "ca.pem"),
        *("--trusted-apps", trusted, "--key", tmp_path / "keys/hospital-x", "--skip-check"),
    ]
    (tmp_path / "logs").mkdir()
    processes = Processes(tmp_path / "logs", env)
    try:
        with FirstPortTaken() as choose:
            port = start_on_free_ports(
                lambda ports: _start_supernode(processes, "hospital-x", command, ports),
                choose=choose,
            )
            assert choose.tried == [[choose.port], [port]] and port != choose.port
    finally:
        processes.stop_all()


@needs_nginx
def test_the_sites_port_passes_only_the_fleet_api(centre):
    ca = centre.certs / "ca.pem"
    for method, path in [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/pull-task-input"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/health"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("GET", "/v1/fleet/get-run"),
    ]:
        assert _https(centre.public_port, ca, method, path)[0] == 403, path
    # A Fleet API call reaches the SuperLink (which rejects an empty, unsigned body itself).
    assert _https(centre.public_port, ca, "POST", "/v1/fleet/get-run")[0] not in (403, 404)
    # On the loopback the SuperLink serves everything: the Control API is the operators'.
    assert _https(centre.control_port, ca, "GET", "/health")[0] == 200


@needs_nginx
@needs_ssh_keygen
def test_an_outsider_with_ca_pem_controls_nothing_an_operator_controls_all(centre, tmp_path):
    keys = tmp_path / "keys"
    for name in ("victim", "outsider"):
        _run([SITES / "make-site-key.sh", "--name", name, "--out", keys], centre.env)
    registered = json.loads(
        _run(
            ["flwr", "supernode", "register", keys / "victim.pub", OPERATOR, "--format", "json"],
            centre.env,
        )
    )
    victim = registered["node-id"]
    runs, nodes = centre.run_count(), centre.registered()
    assert nodes[str(victim)] == "registered"

    # Someone who holds only ca.pem and reaches the sites' port, with a fresh Flower config.
    home = tmp_path / "outsider-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "centre"\n[superlink.centre]\n'
        f'address = "127.0.0.1:{centre.public_port}"\n'
        f'root-certificates = "{centre.certs / "ca.pem"}"\n'
    )
    outsider = {**centre.env, "FLWR_HOME": str(home)}
    app = _probe_app(tmp_path / "probe", "outsider")
    for attempt in (
        ["ls", "centre"],
        ["supernode", "register", keys / "outsider.pub", "centre"],
        ["supernode", "unregister", str(victim), "centre"],
        ["run", app, "centre"],
    ):
        done = _attempt(["flwr", *attempt], outsider)
        assert done.returncode != 0, attempt
        assert "403 Forbidden" in done.stdout + done.stderr, attempt
    assert centre.run_count() == runs and centre.registered() == nodes

    # An operator on the centre's machine may do each: ls and register above, flwr run below.
    _run(["flwr", "supernode", "unregister", str(victim), OPERATOR], centre.env)
    assert centre.registered()[str(victim)] == "unregistered"


@needs_nginx
@needs_ssh_keygen
def test_a_bad_setting_is_refused_before_the_run_is_submitted(centre, tmp_path):
    runs = centre.run_count()
    refused = _attempt(
        centre.scripts(
            "start-run.sh",
            *("--app", centre.app, "--output", tmp_path / "out", "--sites", "3"),
            *("--", "federation.secure_aggregation=true"),  # with the default --min-sites 1
        ),
        centre.env,
    )
    assert refused.returncode == 2
    assert "federation.min_sites=1: SecAgg+ sums at least two sites' prompts" in refused.stderr
    assert centre.run_count() == runs and not (tmp_path / "out").exists()


@needs_nginx
@needs_ssh_keygen
def test_a_second_key_under_a_registered_name_is_refused(centre, tmp_path):
    keys = tmp_path / "keys"
    for name in ("first", "second"):
        _run([SITES / "make-site-key.sh", "--name", name, "--out", keys], centre.env)
    _run(
        centre.scripts("register-site.sh", "--name", "hospital-z", "--key", keys / "first.pub"),
        centre.env,
    )
    before = centre.registered()
    second = _attempt(
        centre.scripts("register-site.sh", "--name", "hospital-z", "--key", keys / "second.pub"),
        centre.env,
    )
    assert second.returncode == 2
    assert "error: the name hospital-z is already registered (node " in second.stderr
    assert centre.registered() == before
    listed = _run(centre.scripts("list-sites.sh"), centre.env)
    assert listed.count("hospital-z ") == 1

    nobody = _attempt(centre.scripts("unregister-site.sh", "--name", "hospital-y"), centre.env)
    assert nobody.returncode == 2 and "no registered site is named hospital-y" in nobody.stderr

    # After the centre unregisters the old key, the name takes the new one.
    _run(centre.scripts("unregister-site.sh", "--name", "hospital-z"), centre.env)
    _run(
        centre.scripts("register-site.sh", "--name", "hospital-z", "--key", keys / "second.pub"),
        centre.env,
    )
    _run(centre.scripts("unregister-site.sh", "--name", "hospital-z"), centre.env)


@needs_nginx
@pytest.mark.slow
@pytest.mark.e2e
def test_sites_refuse_an_unsigned_app_and_one_signed_by_another_key(centre, hospitals, tmp_path):
    unsigned = _probe_app(tmp_path / "unsigned", "outsider")
    foreign = _probe_app(tmp_path / "foreign", "impostor")
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "other-key"], centre.env)
    _run(
        [
            sys.executable,
            "-m",
            "fedprompt.federation.app_approval",
            "sign",
            foreign,
            "--key",
            tmp_path / "other-key",
            "--fab-out",
            tmp_path,
        ],
        centre.env,
    )

    # The centre's own script refuses to submit an app that is not signed.
    refused = _attempt(
        centre.scripts(
            "start-run.sh", "--app", unsigned, "--output", tmp_path / "out", "--sites", "3"
        ),
        centre.env,
    )
    assert (
        refused.returncode == 2
        and "is not signed, and every site would refuse it" in refused.stderr
    )

    # An operator may submit any app with flwr run; every hospital refuses these two.
    for app, reason in [
        (unsigned, "it is unsigned"),
        (foreign, f"which {centre.trusted} does not list"),
    ]:
        fab_hash = hashlib.sha256(build_fab(app)).hexdigest()
        run = _run(["flwr", "run", app, OPERATOR, "--stream"], centre.env)
        replies = [line for line in run.splitlines() if "probe reply from" in line]
        assert len(replies) == len(HOSPITALS), run
        assert all("refused app" in reply and reason in reply for reply in replies), replies
        publisher = "outsider" if app == unsigned else "impostor"
        sentence = f"[fedprompt] refused app {publisher}/probe 0.1.0 (FAB {fab_hash}): "
        for name in HOSPITALS:
            log = centre.processes.log(name)
            assert sentence in log and reason in log.split(sentence)[1].splitlines()[0], name


@needs_nginx
@needs_ssh_keygen
@pytest.mark.slow
@pytest.mark.e2e
def test_a_supernode_whose_key_is_not_registered_is_turned_away(centre, tmp_path):
    config = write_site(tmp_path, "intruder")
    _run([SITES / "make-site-key.sh", "--name", "intruder", "--out", tmp_path / "keys"], centre.env)

    def attempt(ports: list[int]) -> subprocess.CompletedProcess:
        done = _attempt(
            [
                SITES / "start-supernode.sh",
                *("--config", config, "--superlink", f"127.0.0.1:{centre.public_port}"),
                *("--ca", centre.certs / "ca.pem", "--trusted-apps", centre.trusted),
                *("--key", tmp_path / "keys/intruder", "--port", ports[0], "--skip-check"),
            ],
            centre.env,
        )
        raise_if_taken(done.stdout + done.stderr)
        return done

    intruder = start_on_free_ports(attempt)
    # What sites/README.md tells a hospital: Flower's code 305 is printed, the status is 1.
    output = intruder.stdout + intruder.stderr
    assert intruder.returncode == 1, output
    assert "Exit Code: 305" in output and "[code: 2004] Failed to activate SuperNode." in output


@needs_nginx
@pytest.mark.slow
@pytest.mark.e2e
def test_the_centres_signed_app_runs_and_survives_a_site_lost_mid_run(
    centre, hospitals_started_again_after, tmp_path
):
    hospitals = hospitals_started_again_after  # hospital-c is killed below
    started = time.monotonic()
    # hospital-d is registered but its SuperNode never starts: it is missing from round 1 on.
    _run([SITES / "make-site-key.sh", "--name", "hospital-d", "--out", tmp_path], centre.env)
    register = ("--name", "hospital-d", "--key", tmp_path / "hospital-d.pub")
    _run(centre.scripts("register-site.sh", *register), centre.env)
    roster = _run([sys.executable, SERVER / "site_registry.py", OPERATOR, "names"], centre.env)
    names = roster.strip().splitlines()[-1].split(",")
    offline = {name.strip("'") for name in names} - set(HOSPITALS)
    assert "hospital-d" in offline
    results = centre.folder / "results"
    run = centre.processes.start(
        "run",
        [
            str(part)
            for part in centre.scripts(
                "start-run.sh",
                *("--app", centre.app, "--output", results, "--sites", "3", "--rounds", "2"),
                *("--", "train.local_epochs=1", "federation.connect_timeout=90"),
            )
        ],
    )
    metrics = results / "metrics.jsonl"
    _wait_until(
        lambda: (
            (metrics.exists() and metrics.read_text().count("\n") >= 1) or run.poll() is not None
        ),
        400,
        "round 1",
    )
    centre.processes.kill("hospital-c")
    run.wait(timeout=400)
    print(f"deployment run: {time.monotonic() - started:.0f} s wall time")
    assert run.returncode == 0, centre.processes.log("run")[-4000:]

    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    first, second = lines
    assert sorted(first["aggregated"]) == HOSPITALS
    assert first["missing"] == dict.fromkeys(
        sorted(offline), "not connected when the round started"
    )
    assert first["num_trained"] == 3
    assert second["num_trained"] == 2 and sorted(second["aggregated"]) == HOSPITALS[:2]
    assert set(second["missing"]) == offline | {"hospital-c"}, second["missing"]
    assert second["missing"]["hospital-c"]  # the reason: unavailable, no reply, not connected
    for name in ("hospital-a", "hospital-b"):
        assert second["sites"][name]["train_loss"] > 0
        assert second["sites"][name]["num_test"] == 8  # all of the site's own test images
    summary = json.loads((results / "summary.json").read_text())
    assert summary["mode"] == "deployment" and summary["final"]["source"] == "federated"
    assert set(summary["final"]["per_site"]) == {"hospital-a", "hospital-b"}
    log = centre.processes.log("run")
    assert "round 2/2" in log and "missing hospital-c" in log
    assert "[fedprompt] running app fedprompt/fedprompt-deployment 0.1.0" in centre.processes.log(
        "hospital-a"
    )

    # Each site keeps its own log of the updates it sent.
    def rounds_sent(name):
        releases = json.loads((hospitals[name].parent / "state/releases.json").read_text())
        return [entry["round"] for entry in releases["releases"]]

    assert rounds_sent("hospital-a") == rounds_sent("hospital-b") == [1, 2]
    assert rounds_sent("hospital-c")[0] == 1
    assert "OK: every image is readable" in centre.processes.log("hospital-a")
