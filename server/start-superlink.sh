#!/usr/bin/env bash
# Start the federation's SuperLink with TLS and SuperNode authentication (runs in the foreground).
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/start-superlink.sh --certs DIR [--host ADDRESS] [--port PORT] [--state DIR]

Starts flower-superlink with TLS (the certificates server/make-certificates.sh made) and with
SuperNode authentication: only SuperNodes whose public key was registered with
server/register-site.sh may join. One HTTPS port serves the sites, flwr run and flwr supernode
register. It runs in the foreground (stop it with Ctrl-C); run it under systemd or tmux.

Options:
  --certs DIR    folder with ca.pem, server.pem and server.key
  --host ADDR    address to listen on (default 0.0.0.0: every interface)
  --port PORT    HTTPS port the sites reach (default 9092; open it in the firewall)
  --state DIR    folder for the SuperLink's database, which keeps registered sites and runs
                 across restarts (default: state/ beside --certs)
  -h, --help     this text
TXT
}

certs="" host="0.0.0.0" port=9092 state=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --certs) certs="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --state) state="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$certs" ]]; then
    echo "error: give --certs DIR (see --help)" >&2
    exit 2
fi

# shellcheck source=server/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
fp_setup_flower
for file in ca.pem server.pem server.key; do
    fp_require_file "$certs/$file" "make it with server/make-certificates.sh --out $certs --host <name or address>."
done
state="${state:-$certs/../state}"
mkdir -p "$state"

exec flower-superlink \
    --ssl-ca-certfile "$certs/ca.pem" \
    --ssl-certfile "$certs/server.pem" \
    --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --host "$host" \
    --port "$port" \
    --database "$state/superlink.db" \
    --disable-runtime-dependency-installation
