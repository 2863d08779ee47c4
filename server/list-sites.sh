#!/usr/bin/env bash
# List the sites registered with the SuperLink: name, node id, status.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/list-sites.sh --ca ca.pem [--control HOST:PORT] [--connection NAME]

Prints each registered site's name, node id and status (registered: never connected; online;
offline). Run it on the SuperLink's machine (the Control API listens on its loopback only).

Options:
  --ca FILE           the federation's ca.pem
  --control H:P       the SuperLink's Control API (default 127.0.0.1:9091)
  --connection NAME   the flwr connection to write and use (default fedprompt-centre)
  -h, --help          this text
TXT
}

# shellcheck source=server/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ca="" control="$FP_CONTROL_DEFAULT" connection="$FP_CONNECTION_DEFAULT"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --ca) ca="$2"; shift 2 ;;
        --control) control="$2"; shift 2 ;;
        --connection) connection="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$ca" ]]; then
    echo "error: give --ca (see --help)" >&2
    exit 2
fi
fp_setup_flower
fp_require_file "$ca" "it is the ca.pem server/make-certificates.sh made."
fp_write_connection "$connection" "$control" "$ca" >/dev/null
fp_site_registry "$connection" list
