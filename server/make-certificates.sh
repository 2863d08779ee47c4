#!/usr/bin/env bash
# Make the federation's certificate authority (CA) and the SuperLink's TLS certificate.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/make-certificates.sh --out DIR --host NAME_OR_ADDRESS [--host ...] [--days N]

Creates, in DIR:
  ca.pem       the federation's CA certificate: send it to every site (it is public)
  ca.key       the CA's private key: keep it offline and secret
  server.pem   the SuperLink's certificate, valid for every --host given
  server.key   the SuperLink's private key: stays on the SuperLink's machine

Each --host is a DNS name (fl.hospital-network.org) or an IP address (10.0.0.5) that sites
will use to reach the SuperLink; a site connecting under any other name is refused by TLS.
The certificate also names localhost and 127.0.0.1, where nginx and the operators' commands
reach the SuperLink on its own machine.
Run it again with other --host values to renew the server certificate: an existing CA in DIR
is kept, so sites need nothing new.

Options:
  --out DIR      folder for the four files (created if needed)
  --host H       a name or address of the SuperLink (repeat for several)
  --days N       validity of the server certificate in days (default 825; the CA: 3650)
  -h, --help     this text
TXT
}

out="" days=825
hosts=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --host) hosts+=("$2"); shift 2 ;;
        --days) days="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$out" || ${#hosts[@]} -eq 0 ]]; then
    echo "error: give --out DIR and at least one --host (see --help)" >&2
    exit 2
fi
if ! command -v openssl >/dev/null; then
    echo "error: openssl is not installed; install it (apt-get install openssl) and run this again." >&2
    exit 2
fi

mkdir -p "$out"
umask 077
# localhost and 127.0.0.1 too: nginx reaches the SuperLink there, and so do operators' commands.
san=""
for host in "${hosts[@]}" localhost 127.0.0.1; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then
        entry="IP:$host"
    else
        entry="DNS:$host"
    fi
    [[ ",$san," == *",$entry,"* ]] || san+="${san:+,}$entry"
done

if [[ -f "$out/ca.key" && -f "$out/ca.pem" ]]; then
    echo "Keeping the existing CA in $out (sites already trust it)."
else
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
        -keyout "$out/ca.key" -out "$out/ca.pem" -days 3650 \
        -subj "/CN=fedprompt federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    echo "Made the CA: $out/ca.pem (send to sites), $out/ca.key (keep secret)."
fi

extensions="$(mktemp)"
trap 'rm -f "$extensions" "$out/server.csr"' EXIT
printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyAgreement" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=$san" >"$extensions"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
    -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=${hosts[0]}" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -CAcreateserial -out "$out/server.pem" -days "$days" -sha384 -extfile "$extensions" 2>/dev/null
chmod 644 "$out/ca.pem" "$out/server.pem"
echo "Made the SuperLink certificate for $san: $out/server.pem, $out/server.key."
