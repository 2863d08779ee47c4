#!/usr/bin/env bash
# Register a site's public key with the SuperLink, so that its SuperNode may join.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/register-site.sh --name SITE --key SITE_KEY.pub --ca ca.pem
                               [--control HOST:PORT] [--connection NAME]

Registers the public key a site sent you (made with sites/make-site-key.sh) under the site's
name. The name is how the run's logs and metrics.jsonl refer to the site; it belongs to one key,
so a second key under a registered name is refused (unregister the old one first with
server/unregister-site.sh). A SuperNode whose key is not registered is refused.

Run it on the SuperLink's machine: the Control API listens on its loopback only (from elsewhere,
forward it first: ssh -L 9091:127.0.0.1:9091 <centre>).

Options:
  --name SITE         the site's name, e.g. hospital-a (as in its site config)
  --key FILE          the site's public key (SITE.pub, one line starting ecdsa-sha2-nistp384)
  --ca FILE           the federation's ca.pem
  --control H:P       the SuperLink's Control API (default 127.0.0.1:9091)
  --connection NAME   the flwr connection to write and use (default fedprompt-centre)
  -h, --help          this text

List the registered sites with: server/list-sites.sh --ca ca.pem
TXT
}

# shellcheck source=server/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
name="" key="" ca="" control="$FP_CONTROL_DEFAULT" connection="$FP_CONNECTION_DEFAULT"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --key) key="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --control) control="$2"; shift 2 ;;
        --connection) connection="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$name" || -z "$key" || -z "$ca" ]]; then
    echo "error: give --name, --key and --ca (see --help)" >&2
    exit 2
fi

fp_setup_flower
fp_require_file "$key" "ask the site for the .pub file sites/make-site-key.sh made."
fp_require_file "$ca" "it is the ca.pem server/make-certificates.sh made."
if ! grep -q '^ecdsa-sha2-nistp384 ' "$key"; then
    echo "error: $key is not an ECDSA P-384 public key; the site makes one with sites/make-site-key.sh." >&2
    exit 2
fi
fp_write_connection "$connection" "$control" "$ca"
fp_site_registry "$connection" free "$name"
flwr supernode register "$key" "$connection" --name "$name"
