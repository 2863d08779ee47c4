#!/usr/bin/env bash
# Start this site's SuperNode: it joins the federation over TLS with the site's key.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: sites/start-supernode.sh --config site.yaml --superlink HOST:PORT --ca ca.pem --key KEY
                                --trusted-apps FILE [--port PORT] [--skip-check]

Checks the site's images (fedprompt site check), then runs the Flower SuperNode in the
foreground (stop it with Ctrl-C; run it under systemd or tmux to keep it up). The SuperNode only
makes outgoing HTTPS connections to the SuperLink; nothing connects to this machine. If the
SuperLink is down or restarts, the SuperNode keeps trying and rejoins by itself.

It runs only apps signed by a key that --trusted-apps lists: any other app sent to it is refused
before it is installed, with a line in this log naming the app and the reason, and the centre
gets an error reply instead of a result.

Options:
  --config FILE     this site's config (a filled-in copy of sites/site.example.yaml)
  --superlink H:P   the SuperLink's address, as the coordinating centre gave it
  --ca FILE         the federation's ca.pem, from the coordinating centre
  --key FILE        this site's private key (sites/make-site-key.sh made it)
  --trusted-apps F  the keys whose signed apps this site runs (OpenSSH allowed-signers lines,
                    e.g. /etc/fedprompt/trusted-apps; see sites/README.md, "Approve the app")
  --port PORT       a free local port for the SuperNode's own API on 127.0.0.1 (default 9094;
                    give each SuperNode on one machine its own)
  --skip-check      do not read every image first (faster restarts of a checked site)
  -h, --help        this text
TXT
}

config="" superlink="" ca="" key="" trusted="" port=9094 check=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --superlink) superlink="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --key) key="$2"; shift 2 ;;
        --trusted-apps) trusted="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --skip-check) check=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$config" || -z "$superlink" || -z "$ca" || -z "$key" || -z "$trusted" ]]; then
    echo "error: give --config, --superlink, --ca, --key and --trusted-apps (see --help)" >&2
    exit 2
fi
if [[ ! -f "$trusted" ]] || ! grep -q '^[^#[:space:]]' "$trusted"; then
    echo "error: $trusted lists no app signer, so this site would run nothing; add the centre's line (sites/README.md, \"Approve the app\")." >&2
    exit 2
fi
if ! command -v ssh-keygen >/dev/null; then
    echo "error: ssh-keygen is not installed; install OpenSSH's client tools (apt-get install openssh-client)." >&2
    exit 2
fi
for file in "$config" "$ca" "$key"; do
    if [[ ! -f "$file" ]]; then
        echo "error: $file does not exist (see --help for what each file is)." >&2
        exit 2
    fi
done
supernode="$(command -v flower-supernode || true)"
if [[ -z "$supernode" ]]; then
    echo "error: flower-supernode is not on PATH; activate the environment fedprompt is installed in." >&2
    exit 2
fi
# Flower's commands from fedprompt's environment first: the SuperNode starts its helpers by name.
bin="$(dirname "$supernode")"
export PATH="$bin:$PATH"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"

if [[ "$check" == 1 ]]; then
    "$bin/fedprompt" site check "$config"
fi

# The SuperNode starts each ClientApp as `flwr-clientapp`, looked up on PATH: a private folder
# first on PATH holds one that checks the app's signature before Flower installs it, and
# refusing stand-ins for every other kind of task Flower could start.
approved_bin="$(mktemp -d "${TMPDIR:-/tmp}/fedprompt-site.XXXXXX")"
supernode_pid=""
stop() {
    trap - EXIT INT TERM
    if [[ -n "$supernode_pid" ]]; then
        kill -TERM "$supernode_pid" 2>/dev/null || true
        wait "$supernode_pid" || true
    fi
    rm -rf "$approved_bin"
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT
"$bin/python" -m fedprompt.federation.app_approval write-bin "$approved_bin" --trusted-apps "$trusted"
export PATH="$approved_bin:$PATH"

flower-supernode \
    --superlink "$superlink" \
    --root-certificates "$ca" \
    --auth-supernode-private-key "$key" \
    --node-config "site-config=\"$config\"" \
    --port "$port" &
supernode_pid=$!
status=0
wait "$supernode_pid" || status=$?
supernode_pid=""
exit "$status"
