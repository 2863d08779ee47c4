#!/usr/bin/env bash
# Start this site's SuperNode: it joins the federation over TLS with the site's key.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: sites/start-supernode.sh --config site.yaml --superlink HOST:PORT --ca ca.pem --key KEY
                                [--port PORT] [--skip-check]

Checks the site's images (fedprompt site check), then runs the Flower SuperNode in the
foreground (stop it with Ctrl-C; run it under systemd or tmux to keep it up). The SuperNode only
makes outgoing HTTPS connections to the SuperLink; nothing connects to this machine. If the
SuperLink is down or restarts, the SuperNode keeps trying and rejoins by itself.

Options:
  --config FILE     this site's config (a filled-in copy of sites/site.example.yaml)
  --superlink H:P   the SuperLink's address, as the coordinating centre gave it
  --ca FILE         the federation's ca.pem, from the coordinating centre
  --key FILE        this site's private key (sites/make-site-key.sh made it)
  --port PORT       a free local port for the SuperNode's own API on 127.0.0.1 (default 9094;
                    give each SuperNode on one machine its own)
  --skip-check      do not read every image first (faster restarts of a checked site)
  -h, --help        this text
TXT
}

config="" superlink="" ca="" key="" port=9094 check=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --superlink) superlink="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --key) key="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --skip-check) check=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$config" || -z "$superlink" || -z "$ca" || -z "$key" ]]; then
    echo "error: give --config, --superlink, --ca and --key (see --help)" >&2
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
exec flower-supernode \
    --superlink "$superlink" \
    --root-certificates "$ca" \
    --auth-supernode-private-key "$key" \
    --node-config "site-config=\"$config\"" \
    --port "$port"
