#!/usr/bin/env bash
# Make this site's key pair: the private key stays here, the public key goes to the centre.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: sites/make-site-key.sh --name SITE --out DIR

Creates DIR/SITE (the private key: never send it, readable only by you) and DIR/SITE.pub (the
public key: e-mail it to the coordinating centre, which registers it under SITE). The SuperNode
proves it is this site with the private key; a SuperNode without a registered key is refused.

Options:
  --name SITE   this site's name, e.g. hospital-a (as in site_name of the site config)
  --out DIR     folder for the two files (created if needed)
  -h, --help    this text
TXT
}

name="" out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$name" || -z "$out" ]]; then
    echo "error: give --name and --out (see --help)" >&2
    exit 2
fi
if ! command -v ssh-keygen >/dev/null; then
    echo "error: ssh-keygen is not installed; install OpenSSH's client tools (apt-get install openssh-client)." >&2
    exit 2
fi
if [[ -e "$out/$name" ]]; then
    echo "error: $out/$name exists already; keep using it (its .pub is what the centre registered)." >&2
    exit 2
fi
mkdir -p "$out"
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
chmod 600 "$out/$name"
echo "Private key: $out/$name (keep it here). Send $out/$name.pub to the coordinating centre."
