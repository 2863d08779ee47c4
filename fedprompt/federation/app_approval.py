"""Sites run only the Flower apps the centre signed: a FAB's manifest, its signature, the check.

Flower's ``flower-supernode --trusted-entities`` accepts only FABs that Flower Hub vouched for, so
offline it refuses every app a centre submits with ``flwr run``. The check therefore happens at the
one point a site still controls: the ``flwr-clientapp`` process its SuperNode starts by name, which
installs the FAB before loading the app. ``sites/start-supernode.sh`` puts a folder first on PATH
whose ``flwr-clientapp`` runs :func:`run_approved_clientapp`: Flower's own ``flwr-clientapp``, its
FAB installation wrapped by :func:`verify_fab`.

The centre signs the app's manifest (every file of the FAB as Flower packs it, with its SHA-256)
with OpenSSH's signature format (``ssh-keygen -Y sign``); the signature travels inside the FAB as
:data:`SIGNATURE_FILE`. A site accepts the FAB only if a key in its OpenSSH allowed-signers file
made that signature for the namespace :data:`NAMESPACE` and the FAB's files are exactly the
signed ones.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import shlex
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

NAMESPACE = "fedprompt-app"
SIGNATURE_FILE = "fedprompt-app.sig.json"  # a .json file: `flwr build` ships it in the FAB
MAX_UNPACKED = 200 * 1024 * 1024  # a FAB is at most 10 MB packed; refuse an archive bomb unread
CLIENTAPP_COMMAND = "flwr-clientapp"


class AppNotApproved(Exception):
    """The app is unsigned, signed by a key the site does not list, or not what was signed."""


@dataclass(frozen=True)
class AppIdentity:
    """Who published the app, which one, and the FAB's hash: what a refusal names."""

    publisher: str
    name: str
    version: str
    fab_hash: str

    def __str__(self) -> str:
        return f"{self.publisher}/{self.name} {self.version} (FAB {self.fab_hash})"


@dataclass(frozen=True)
class SignedApp:
    """A FAB's manifest, its signature (if any), what it declares, and who it is."""

    identity: AppIdentity
    manifest: str
    signed_manifest: str | None
    signature: str | None
    project: dict[str, Any]


@dataclass(frozen=True)
class Approval:
    """An accepted app: the allowed signer who signed it and that key's fingerprint."""

    identity: AppIdentity
    principal: str
    fingerprint: str


def manifest_of(digests: dict[str, str]) -> str:
    """One ``sha256  path`` line per file, sorted by path (the ``sha256sum`` format)."""
    return "".join(f"{digests[path]}  {path}\n" for path in sorted(digests))


def _lookup(table: Any, *keys: str) -> Any:
    """A nested TOML value, or None where a level is missing or not a table."""
    for key in keys:
        table = table.get(key) if isinstance(table, dict) else None
    return table


def _sha256(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    digest = hashlib.sha256()
    with archive.open(info) as member:
        while chunk := member.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_fab(fab: bytes) -> SignedApp:
    """The manifest of a FAB's files, leaving out Flower's metadata and the signature itself.

    Raises:
        AppNotApproved: the bytes are not a FAB, unpack to more than :data:`MAX_UNPACKED` bytes,
            or list one path twice (an archive whose installed file would differ from the one
            a reviewer reads).
    """
    fab_hash = hashlib.sha256(fab).hexdigest()
    refused = f"refused app {AppIdentity('?', '?', '?', fab_hash)}"
    digests: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            infos = archive.infolist()
            if sum(info.file_size for info in infos) > MAX_UNPACKED:
                raise AppNotApproved(f"{refused}: it unpacks to more than {MAX_UNPACKED} bytes")
            for info in infos:
                if info.filename in digests:
                    raise AppNotApproved(f"{refused}: its archive lists {info.filename} twice")
                digests[info.filename] = _sha256(archive, info)
                if info.filename in ("pyproject.toml", SIGNATURE_FILE):
                    kept[info.filename] = archive.read(info)
    except (zipfile.BadZipFile, OSError) as err:
        raise AppNotApproved(f"{refused}: it is not a Flower app bundle: {err}") from err
    digests.pop(SIGNATURE_FILE, None)
    # Flower's own hash list (.info/): install_from_fab deletes that folder, never installs it.
    digests = {path: digest for path, digest in digests.items() if not path.startswith(".info/")}
    try:
        project = tomllib.loads(kept.get("pyproject.toml", b"").decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        project = {}
    identity = AppIdentity(
        publisher=str(_lookup(project, "tool", "flwr", "app", "publisher") or "?"),
        name=str(_lookup(project, "project", "name") or "?"),
        version=str(_lookup(project, "project", "version") or "?"),
        fab_hash=fab_hash,
    )
    signed_manifest = signature = None
    if SIGNATURE_FILE in kept:
        try:
            stored = json.loads(kept[SIGNATURE_FILE])
            signed_manifest, signature = str(stored["manifest"]), str(stored["signature"])
        except (ValueError, KeyError, TypeError) as err:
            raise AppNotApproved(
                f"refused app {identity}: its {SIGNATURE_FILE} is not a fedprompt signature file"
            ) from err
    return SignedApp(identity, manifest_of(digests), signed_manifest, signature, project)


def build_fab(app_dir: Path) -> bytes:
    """The FAB ``flwr run`` would send for this folder, built by Flower itself."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(app_dir)
    except ValueError as err:
        raise AppNotApproved(f"{app_dir} is not a Flower app folder: {err}") from err


def _ssh_keygen(args: list[str], data: str, signature: str | None = None) -> tuple[int, str]:
    """Run ``ssh-keygen -Y ...`` on data (and a signature file); exit status and its output."""
    with tempfile.TemporaryDirectory() as folder:
        command = ["ssh-keygen", "-Y", *args]
        if signature is not None:
            signature_path = Path(folder) / "app.sig"
            signature_path.write_text(signature)
            command += ["-s", str(signature_path)]
        try:
            done = subprocess.run(command, input=data, capture_output=True, text=True, timeout=60)
        except FileNotFoundError as err:
            raise AppNotApproved(
                "ssh-keygen is not installed; install OpenSSH's client tools "
                "(apt-get install openssh-client)"
            ) from err
    return done.returncode, (done.stdout + done.stderr).strip()


def signing_key(manifest: str, signature: str) -> str | None:
    """The fingerprint of the key that made this signature of the manifest, or None if invalid."""
    code, output = _ssh_keygen(["check-novalidate", "-n", NAMESPACE], manifest, signature)
    if code != 0:
        return None
    # 'Good "fedprompt-app" signature with ED25519 key SHA256:...'
    return output.splitlines()[-1].split(" with ", 1)[-1]


def _difference(signed: str, actual: str) -> str:
    """Which files were added, changed or removed since the manifest was signed."""

    def by_path(manifest: str) -> dict[str, str]:
        return {
            path: digest
            for digest, path in (line.split("  ", 1) for line in manifest.splitlines() if line)
        }

    before, after = by_path(signed), by_path(actual)
    parts = [
        f"{what} {', '.join(paths)}"
        for what, paths in (
            ("added", sorted(set(after) - set(before))),
            ("changed", sorted(p for p in set(after) & set(before) if after[p] != before[p])),
            ("removed", sorted(set(before) - set(after))),
        )
        if paths
    ]
    return "; ".join(parts)


def verify_signed(app: SignedApp, trusted: Path) -> Approval:
    """Accept the app only if a key listed in ``trusted`` signed exactly these files.

    Args:
        app: what :func:`read_fab` read from the FAB.
        trusted: the site's OpenSSH allowed-signers file; each line
            ``centre@fedprompt namespaces="fedprompt-app" ssh-ed25519 AAAA...``.

    Raises:
        AppNotApproved: with a sentence naming the app and the reason.
    """
    refused = f"refused app {app.identity}"
    if not trusted.is_file():
        raise AppNotApproved(
            f"{refused}: the site's list of trusted app signers {trusted} does not exist"
        )
    if app.signature is None or app.signed_manifest is None:
        raise AppNotApproved(
            f"{refused}: it is unsigned (it carries no {SIGNATURE_FILE}; the centre signs its app "
            "with server/sign-app.sh)"
        )
    fingerprint = signing_key(app.signed_manifest, app.signature)
    if fingerprint is None:
        raise AppNotApproved(f"{refused}: its signature is not a valid {NAMESPACE} signature")
    code, output = _ssh_keygen(["find-principals", "-f", str(trusted)], "", app.signature)
    if code != 0 or not output:
        raise AppNotApproved(
            f"{refused}: it is signed by {fingerprint}, which {trusted} does not list"
        )
    principal = output.splitlines()[0]
    code, output = _ssh_keygen(
        ["verify", "-f", str(trusted), "-I", principal, "-n", NAMESPACE],
        app.signed_manifest,
        app.signature,
    )
    if code != 0:
        raise AppNotApproved(
            f"{refused}: {trusted} lists its signer {principal} ({fingerprint}), but not for "
            f"signing {NAMESPACE} apps now ({output.splitlines()[-1]})"
        )
    if app.manifest != app.signed_manifest:
        raise AppNotApproved(
            f"{refused}: its files differ from what {principal} signed "
            f"({_difference(app.signed_manifest, app.manifest)})"
        )
    return Approval(app.identity, principal, fingerprint)


def verify_fab(fab: bytes, trusted: Path) -> Approval:
    """Accept a FAB only if a key listed in ``trusted`` signed exactly its files."""
    return verify_signed(read_fab(fab), trusted)


def sign_app(app_dir: Path, key: Path, fab_out: Path) -> tuple[str, Path]:
    """Sign the FAB Flower builds from ``app_dir`` with the centre's key; the signer and the FAB.

    The signature covers the files as ``flwr run`` packs them (Flower rewrites pyproject.toml),
    so any later change to the folder makes sites refuse the app until it is signed again. The
    signed FAB, named the way ``flwr build`` names it, is what hospitals review.
    """
    from flwr.cli.build import get_fab_filename

    app = read_fab(build_fab(app_dir))
    done = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", NAMESPACE, "-f", str(key)],
        input=app.manifest,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise AppNotApproved(f"ssh-keygen could not sign with {key}: {done.stderr.strip()}")
    (app_dir / SIGNATURE_FILE).write_text(
        json.dumps({"manifest": app.manifest, "signature": done.stdout}, indent=1) + "\n"
    )
    fab = build_fab(app_dir)
    fab_out.mkdir(parents=True, exist_ok=True)
    fab_path = fab_out / get_fab_filename(app.project, hashlib.sha256(fab).hexdigest())
    fab_path.write_bytes(fab)
    return f"{read_fab(fab).identity}, {signing_key(app.manifest, done.stdout)}", fab_path


def check_current(app_dir: Path) -> str:
    """Refuse an app folder whose signature is missing, invalid or older than its files.

    The centre's own check before ``flwr run``: every site would refuse such an app. Which key
    signed is each site's decision (its allowed-signers file), so it is only reported here.
    """
    app = read_fab(build_fab(app_dir))
    if app.signature is None or app.signed_manifest is None:
        raise AppNotApproved(
            f"{app_dir} is not signed, and every site would refuse it; sign it with "
            "server/sign-app.sh --key <the centre's signing key>"
        )
    fingerprint = signing_key(app.signed_manifest, app.signature)
    if fingerprint is None:
        raise AppNotApproved(f"{app_dir}/{SIGNATURE_FILE} is not a valid signature; sign again")
    if app.manifest != app.signed_manifest:
        raise AppNotApproved(
            f"{app_dir} changed since it was signed "
            f"({_difference(app.signed_manifest, app.manifest)}), and every site would refuse "
            "it; review the change, then run server/sign-app.sh again"
        )
    return f"{app.identity}, signed by {fingerprint}"


def _component_origin(reference: str, packed: set[str]) -> str:
    """Where a component's code comes from: inside the FAB, or a package installed at the site."""
    module = reference.split(":", 1)[0]
    top = module.split(".", 1)[0]
    if any(path == f"{top}.py" or path.startswith(f"{top}/") for path in packed):
        return "code inside this app"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return "not installed at this site"
    return f"installed at this site: {spec.origin}"


def review(source: Path, trusted: Path | None) -> tuple[bool, str]:
    """What a hospital reads before approving an app: identity, components, files, signer.

    Args:
        source: a ``.fab`` file or an app folder (built into the FAB ``flwr run`` would send).
        trusted: the site's allowed-signers file, or None to show the signer only.

    Returns:
        Whether this site would run the app, and the report.
    """
    fab = source.read_bytes() if source.is_file() else build_fab(source)
    app = read_fab(fab)
    packed = {line.split("  ", 1)[1] for line in app.manifest.splitlines()}
    lines = [f"App: {app.identity}", "Components (what it runs):"]
    components = _lookup(app.project, "tool", "flwr", "app", "components") or {}
    for role, reference in sorted(components.items()):
        where = "at the centre" if role == "serverapp" else "at your site"
        origin = _component_origin(str(reference), packed)
        lines.append(f"  {role} = {reference} ({where}; {origin})")
    dependencies = [str(d) for d in _lookup(app.project, "project", "dependencies") or []]
    lines.append(f"Dependencies it asks to install: {', '.join(dependencies) or 'none'}")
    settings = sorted(_lookup(app.project, "tool", "flwr", "app", "config") or {})
    lines.append(f"Settings the centre may choose per run: {', '.join(settings) or 'none'}")
    lines.append("Files (sha256 as Flower packs them; Flower's .info/ and the signature left out):")
    lines += [f"  {line}" for line in app.manifest.splitlines()]
    fingerprint = (
        signing_key(app.signed_manifest, app.signature)
        if app.signature and app.signed_manifest
        else None
    )
    lines.append(f"Signed by: {fingerprint or 'nobody (no valid signature)'}")
    if trusted is None:
        lines.append(
            "Not checked against a list of trusted signers (give --trusted-apps FILE); compare the "
            "fingerprint with the one the centre told you before listing its key."
        )
        return False, "\n".join(lines)
    try:
        approval = verify_signed(app, trusted)
    except AppNotApproved as refusal:
        lines.append(f"NOT APPROVED: this site would refuse it: {refusal}")
        return False, "\n".join(lines)
    lines.append(
        f"APPROVED: signed by {approval.principal}, whom {trusted} lists; this site will run it."
    )
    return True, "\n".join(lines)


def approved_install(
    install: Callable[..., Any], trusted: Path, log: Callable[..., None]
) -> Callable[..., Any]:
    """Flower's ``install_from_fab``, which first refuses a FAB the site has not approved."""

    def install_if_approved(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Any:
        fab = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            approval = verify_fab(fab, trusted)
        except AppNotApproved as refusal:
            log(ERROR, "[fedprompt] %s", refusal)
            raise
        log(INFO, "[fedprompt] running app %s, signed by %s", approval.identity, approval.principal)
        return install(fab_file, *args, **kwargs)

    return install_if_approved


def run_approved_clientapp(trusted: Path, flower_args: Sequence[str]) -> None:
    """Flower's ``flwr-clientapp``, with every FAB checked before it is installed or loaded.

    A refused FAB raises inside Flower's task, so Flower logs it, sends the centre an error reply
    naming the reason, and the process exits with Flower's task-failure status.
    """
    from flwr.common.logger import log
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as flower_runtime

    flower_runtime.install_from_fab = approved_install(
        flower_runtime.install_from_fab, trusted, log
    )
    sys.argv = [CLIENTAPP_COMMAND, *flower_args]
    flwr_clientapp()


def write_site_bin(folder: Path, trusted: Path, python: str = sys.executable) -> None:
    """The commands a SuperNode's SuperExec starts, to put first on its PATH.

    ``flwr-clientapp`` checks each app against ``trusted``; every other task command Flower knows
    (agent apps, connectors, models, server apps, simulations) refuses to start, since a hospital's
    SuperNode only ever runs ClientApps and any other task would bypass the check.
    """
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder.mkdir(parents=True, exist_ok=True)
    for command in sorted(set(TASK_TYPE_TO_COMMAND.values())):
        if command == CLIENTAPP_COMMAND:
            body = (
                f"exec {shlex.quote(python)} -m fedprompt.federation.app_approval clientapp "
                f'--trusted-apps {shlex.quote(str(trusted.resolve()))} "$@"\n'
            )
        else:
            sentence = (
                f"fedprompt: refused to start {command}: this site runs only ClientApps that a "
                f"key in {trusted.resolve()} signed."
            )
            body = f"echo {shlex.quote(sentence)} >&2\nexit 1\n"
        path = folder / command
        path.write_text(f"#!/bin/sh\n{body}")
        path.chmod(0o755)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedprompt.federation.app_approval",
        description="Sign the centre's Flower app, check it, and run only approved apps at a site.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sign = commands.add_parser("sign", help="sign an app folder with the centre's key")
    sign.add_argument("app", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the centre's private signing key")
    sign.add_argument("--fab-out", type=Path, default=Path(), help="folder for the signed FAB")
    check = commands.add_parser("check", help="refuse an unsigned or stale app folder")
    check.add_argument("app", type=Path)
    site_bin = commands.add_parser("write-bin", help="the SuperNode's private command folder")
    site_bin.add_argument("folder", type=Path)
    site_bin.add_argument("--trusted-apps", type=Path, required=True)
    # Flower's own options (--token, --runtime-api-address, ...) pass through: no abbreviations.
    clientapp = commands.add_parser(
        "clientapp", help="flwr-clientapp, approved apps only", allow_abbrev=False
    )
    clientapp.add_argument("--trusted-apps", type=Path, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The scripts' entry point; ``clientapp`` passes the remaining arguments to Flower."""
    args, rest = _parser().parse_known_args(argv)
    if args.command == "clientapp":
        run_approved_clientapp(args.trusted_apps, rest)
        return 0
    if rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "sign":
            signer, fab = sign_app(args.app.resolve(), args.key, args.fab_out)
            print(f"Signed {signer}.\nSigned app bundle, for the hospitals to review: {fab}")
        elif args.command == "check":
            print(f"App {check_current(args.app.resolve())}")
        else:
            write_site_bin(args.folder, args.trusted_apps)
    except AppNotApproved as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
