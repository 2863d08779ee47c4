# Shared by the server/ scripts (sourced, not run): tool checks, a quiet offline Flower, and the
# named SuperLink connection that `flwr` commands use.

# The Control API listens only on the centre's loopback (server/start-superlink.sh), so operators
# work on that machine or through `ssh -L 9091:127.0.0.1:9091 <centre>`.
FP_CONTROL_DEFAULT="127.0.0.1:9091"
# Not a folder name such as fedprompt/: flwr takes a folder holding a pyproject.toml for an app.
FP_CONNECTION_DEFAULT="fedprompt-centre"

# Flower's commands from the environment fedprompt is installed in, first on PATH: the SuperLink
# starts its helper processes (flower-superexec) by looking them up there.
fp_setup_flower() {
    local flwr_path
    flwr_path="$(command -v flwr || true)"
    if [[ -z "$flwr_path" ]]; then
        echo "error: the flwr command is not on PATH; activate the environment fedprompt is installed in (pip install -e .)." >&2
        exit 2
    fi
    FP_BIN="$(dirname "$flwr_path")"
    FP_PYTHON="$FP_BIN/python"
    export PATH="$FP_BIN:$PATH"
    export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
    export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:-1}"
}

fp_require_file() {
    if [[ ! -f "$1" ]]; then
        echo "error: $1 does not exist; $2" >&2
        exit 2
    fi
}

# Write (or update) the connection NAME in $FLWR_HOME/config.toml (default ~/.flwr), so that
# `flwr run <app> NAME` and `flwr supernode register <key> NAME` reach the SuperLink over TLS.
fp_write_connection() {
    local name="$1" address="$2" ca="$3"
    "$FP_PYTHON" - "$name" "$address" "$ca" <<'PY'
import os, sys, tomllib
from pathlib import Path
import tomli_w
name, address, ca = sys.argv[1], sys.argv[2], str(Path(sys.argv[3]).resolve())
path = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "config.toml"
data = tomllib.loads(path.read_text()) if path.exists() else {}
links = data.setdefault("superlink", {})
links[name] = {"address": address, "root-certificates": ca}
links.setdefault("default", name)
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(tomli_w.dumps(data))
print(f"connection {name}: {address} (CA {ca}) in {path}")
PY
}

# The sites registered under names (server/site_registry.py): list, free NAME, unregister NAME.
fp_site_registry() {
    "$FP_PYTHON" "$(dirname "${BASH_SOURCE[0]}")/site_registry.py" "$@"
}
