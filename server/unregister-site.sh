#!/usr/bin/env bash
# Unregister a site's key: its SuperNode can no longer join.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/unregister-site.sh --name SITE --ca ca.pem [--control HOST:PORT] [--connection NAME]

Unregisters the key registered under SITE: the site left, or its key was exposed. A new key
may then be registered under the same name (server/register-site.sh). Run it on the
SuperLink's machine (the Control API listens on its loopback only).

Options:
  --name SITE         the site's registered name
  --ca FILE           the federation's ca.pem
  --control H:P       the SuperLink's Control API (default 127.0.0.1:9091)
  --connection NAME   the flwr connection to write and use (default fedprompt-centre)
  -h, --help          this text
TXT
}

# shellcheck source=server/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
name="" ca="" control="$FP_CONTROL_DEFAULT" connection="$FP_CONNECTION_DEFAULT"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --control) control="$2"; shift 2 ;;
        --connection) connection="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$name" || -z "$ca" ]]; then
    echo "error: give --name and --ca (see --help)" >&2
    exit 2
fi
fp_setup_flower
fp_require_file "$ca" "it is the ca.pem server/make-certificates.sh made."
fp_write_connection "$connection" "$control" "$ca" >/dev/null
fp_site_registry "$connection" unregister "$name"
