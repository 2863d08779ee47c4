"""A site runs only apps whose files a key it lists signed: manifest, signature, verification."""

import hashlib
import io
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from fedprompt.cli import main as fedprompt_main
from fedprompt.federation import app_approval
from fedprompt.federation.app_approval import (
    NAMESPACE,
    SIGNATURE_FILE,
    AppNotApproved,
    approved_install,
    build_fab,
    check_current,
    main,
    manifest_of,
    read_fab,
    review,
    sign_app,
    verify_fab,
    write_site_bin,
)

pytestmark = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) is not installed"
)

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "centre"

[tool.flwr.app.components]
serverapp = "fedprompt.federation.server_app:app"
clientapp = "probe_client:app"

[tool.flwr.app.config]
rounds = 2
"""


def _key(folder: Path, name: str) -> Path:
    key = folder / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True
    )
    return key


def _allowed(path: Path, key: Path, principal: str, namespace: str = NAMESPACE) -> Path:
    key_type, key_data = key.with_suffix(".pub").read_text().split()[:2]
    path.write_text(f'{principal} namespaces="{namespace}" {key_type} {key_data}\n')
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    centre, other = _key(folder, "centre"), _key(folder, "other")
    return centre, other, _allowed(folder / "trusted-apps", centre, "centre@fedprompt")


@pytest.fixture
def app(tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "probe_client.py").write_text("app = None\n")
    return folder


def _signed(app: Path, key: Path, tmp_path: Path) -> bytes:
    _, fab_path = sign_app(app, key, tmp_path / "fabs")
    return fab_path.read_bytes()


def _rezip(fab: bytes, change) -> bytes:
    """The FAB with its entries passed through change(list of (name, bytes))."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in change(entries):
            archive.writestr(name, data)
    return out.getvalue()


def test_the_manifest_lists_every_file_sorted_with_its_sha256(app):
    assert manifest_of({"b.py": "2d71", "a.toml": "e3b0"}) == "e3b0  a.toml\n2d71  b.py\n"
    fab = build_fab(app)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        client = hashlib.sha256(archive.read("probe_client.py")).hexdigest()
    assert f"{client}  probe_client.py\n" in read_fab(fab).manifest


def test_an_archive_bomb_is_refused_before_it_is_unpacked(keys, monkeypatch):
    monkeypatch.setattr(app_approval, "MAX_UNPACKED", 10)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pyproject.toml", b"x" * 11)
    with pytest.raises(AppNotApproved, match="it unpacks to more than 10 bytes"):
        verify_fab(bomb.getvalue(), keys[2])


def test_flowers_metadata_and_the_signature_are_left_out_of_the_manifest(app, keys, tmp_path):
    fab = _signed(app, keys[0], tmp_path)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        assert {".info/CONTENT", SIGNATURE_FILE} <= set(archive.namelist())
    signed = read_fab(fab)
    assert [line.split("  ")[1] for line in signed.manifest.splitlines()] == [
        "probe_client.py",
        "pyproject.toml",
    ]
    assert signed.manifest == signed.signed_manifest
    assert str(signed.identity).startswith("centre/probe 1.0.0 (FAB ")


def test_the_centres_signed_app_is_accepted(app, keys, tmp_path):
    centre, _, trusted = keys
    approval = verify_fab(_signed(app, centre, tmp_path), trusted)
    assert approval.principal == "centre@fedprompt"
    assert approval.fingerprint.startswith("ED25519 key SHA256:")


def test_an_unsigned_app_is_refused_naming_it(app, keys):
    fab = build_fab(app)
    with pytest.raises(
        AppNotApproved, match=r"refused app centre/probe 1.0.0 \(FAB [0-9a-f]{64}\): it is unsigned"
    ):
        verify_fab(fab, keys[2])


def test_an_app_signed_by_a_key_the_site_does_not_list_is_refused(app, keys, tmp_path):
    _, other, trusted = keys
    with pytest.raises(
        AppNotApproved, match=r"signed by ED25519 key SHA256:\S+, which .* does not list"
    ):
        verify_fab(_signed(app, other, tmp_path), trusted)


def test_a_file_changed_after_signing_is_refused(app, keys, tmp_path):
    centre, _, trusted = keys
    fab = _signed(app, centre, tmp_path)
    tampered = _rezip(
        fab,
        lambda entries: [
            (n, b"import os\napp = None\n" if n == "probe_client.py" else d) for n, d in entries
        ],
    )
    with pytest.raises(
        AppNotApproved,
        match=r"differ from what centre@fedprompt signed \(changed probe_client.py\)",
    ):
        verify_fab(tampered, trusted)


def test_a_file_added_after_signing_is_refused(app, keys, tmp_path):
    centre, _, trusted = keys
    fab = _rezip(_signed(app, centre, tmp_path), lambda entries: [*entries, ("evil.py", b"")])
    with pytest.raises(AppNotApproved, match=r"\(added evil.py\)"):
        verify_fab(fab, trusted)


def test_a_signature_over_another_manifest_is_refused(app, keys, tmp_path):
    centre, _, trusted = keys

    def forge(entries):
        for name, data in entries:
            if name == SIGNATURE_FILE:
                stored = json.loads(data)
                stored["manifest"] += "0" * 64 + "  evil.py\n"
                data = json.dumps(stored).encode()
            yield name, data

    with pytest.raises(
        AppNotApproved, match="its signature is not a valid fedprompt-app signature"
    ):
        verify_fab(_rezip(_signed(app, centre, tmp_path), forge), trusted)


def test_a_key_listed_for_another_namespace_is_refused(app, keys, tmp_path):
    centre = keys[0]
    trusted = _allowed(tmp_path / "trusted", centre, "centre@fedprompt", namespace="git")
    with pytest.raises(AppNotApproved, match=r"lists its signer centre@fedprompt .* but not for"):
        verify_fab(_signed(app, centre, tmp_path), trusted)


def test_a_missing_list_of_signers_refuses_everything(app, keys, tmp_path):
    with pytest.raises(AppNotApproved, match=r"list of trusted app signers .* does not exist"):
        verify_fab(_signed(app, keys[0], tmp_path), tmp_path / "nowhere")


def test_an_archive_naming_a_file_twice_is_refused(app, keys, tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        fab = _rezip(
            _signed(app, keys[0], tmp_path),
            lambda entries: [*entries, ("probe_client.py", b"import os\n")],
        )
    with pytest.raises(AppNotApproved, match=r"lists probe_client\.py twice"):
        verify_fab(fab, keys[2])


def test_bytes_that_are_not_a_fab_are_refused(keys):
    with pytest.raises(AppNotApproved, match="not a Flower app bundle"):
        verify_fab(b"not a zip", keys[2])


def test_a_malformed_signature_file_is_refused(app, keys):
    (app / SIGNATURE_FILE).write_text("{}")
    with pytest.raises(AppNotApproved, match="is not a fedprompt signature file"):
        verify_fab(build_fab(app), keys[2])


def test_the_install_wrapper_refuses_before_flower_installs_anything(app, keys, tmp_path):
    installed, logged = [], []
    install = approved_install(
        lambda fab, **kwargs: installed.append(kwargs), keys[2], lambda *a: logged.append(a)
    )
    with pytest.raises(AppNotApproved, match="unsigned"):
        install(build_fab(app), skip_prompt=True)
    assert installed == [] and "unsigned" in logged[0][2].args[0]
    install(_signed(app, keys[0], tmp_path), skip_prompt=True)
    assert installed == [{"skip_prompt": True}]


def test_the_clientapp_entry_point_wraps_flowers_install(monkeypatch, keys):
    from flwr.supernode.runtime import run_clientapp as flower_runtime

    seen = {}

    def fake_flwr_clientapp():
        seen["argv"] = list(app_approval.sys.argv)
        seen["install"] = flower_runtime.install_from_fab

    monkeypatch.setattr(flower_runtime, "install_from_fab", flower_runtime.install_from_fab)
    monkeypatch.setattr("flwr.supernode.cli.flwr_clientapp", fake_flwr_clientapp)
    monkeypatch.setattr(app_approval.sys, "argv", ["python"])
    assert main(["clientapp", "--trusted-apps", str(keys[2]), "--token", "t", "--insecure"]) == 0
    assert seen["argv"] == ["flwr-clientapp", "--token", "t", "--insecure"]
    with pytest.raises(AppNotApproved, match="not a Flower app bundle"):
        seen["install"](b"junk")


def test_the_sites_bin_checks_clientapps_and_refuses_every_other_task(tmp_path, keys):
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    write_site_bin(tmp_path / "bin", keys[2], python="/venv/bin/python")
    clientapp = (tmp_path / "bin/flwr-clientapp").read_text()
    assert "exec /venv/bin/python -m fedprompt.federation.app_approval clientapp" in clientapp
    assert f"--trusted-apps {keys[2].resolve()}" in clientapp
    others = set(TASK_TYPE_TO_COMMAND.values()) - {"flwr-clientapp"}
    assert others and {p.name for p in (tmp_path / "bin").iterdir()} == others | {"flwr-clientapp"}
    for command in others:
        done = subprocess.run([tmp_path / "bin" / command], capture_output=True, text=True)
        assert done.returncode == 1 and f"refused to start {command}" in done.stderr


def test_the_centre_may_not_submit_an_unsigned_or_changed_app(app, keys, tmp_path, capsys):
    with pytest.raises(AppNotApproved, match="is not signed"):
        check_current(app)
    sign_app(app, keys[0], tmp_path / "fabs")
    assert "signed by ED25519 key" in check_current(app)
    (app / "pyproject.toml").write_text(PYPROJECT.replace("rounds = 2", "rounds = 3"))
    assert main(["check", str(app)]) == 2
    assert "changed since it was signed (changed pyproject.toml)" in capsys.readouterr().err


def test_a_site_reviews_what_it_approves(app, keys, tmp_path, capsys):
    centre, _, trusted = keys
    _, fab = sign_app(app, centre, tmp_path / "fabs")
    approved, report = review(fab, trusted)
    assert approved
    assert "clientapp = probe_client:app (at your site; code inside this app)" in report
    assert (
        "serverapp = fedprompt.federation.server_app:app (at the centre; installed at this site"
        in report
    )
    assert "Settings the centre may choose per run: rounds" in report
    assert re.search(r"^  [0-9a-f]{64}  probe_client.py$", report, re.MULTILINE)
    assert report.endswith(
        f"APPROVED: signed by centre@fedprompt, whom {trusted} lists; this site will run it."
    )
    assert fedprompt_main(["site", "review-app", str(app)]) == 1  # no list given: not approved
    assert "compare the fingerprint" in capsys.readouterr().out
    (app / "probe_client.py").write_text("import os\napp = None\n")
    assert fedprompt_main(["site", "review-app", str(app), "--trusted-apps", str(trusted)]) == 1
    assert "NOT APPROVED: this site would refuse it" in capsys.readouterr().out
    assert fedprompt_main(["site", "review-app", str(tmp_path / "nothing")]) == 2


def test_without_ssh_keygen_every_app_is_refused(app, keys, tmp_path, monkeypatch):
    fab = _signed(app, keys[0], tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AppNotApproved, match="ssh-keygen is not installed"):
        verify_fab(fab, keys[2])


def test_signing_with_a_key_that_is_not_there_says_so(app, tmp_path):
    with pytest.raises(AppNotApproved, match="ssh-keygen could not sign with"):
        sign_app(app, tmp_path / "no-key", tmp_path / "fabs")
    assert not (app / SIGNATURE_FILE).exists()


def test_the_centre_may_not_submit_an_app_with_a_broken_signature(app):
    (app / SIGNATURE_FILE).write_text(json.dumps({"manifest": "x", "signature": "junk"}))
    with pytest.raises(AppNotApproved, match="is not a valid signature; sign again"):
        check_current(app)
