#!/usr/bin/env bash
# Sign the centre's Flower app (server/app), so that the hospitals' SuperNodes agree to run it.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/sign-app.sh --key KEY [--new-key [--no-passphrase]] [--app DIR] [--out DIR]

Signs the app folder (default server/app) with the centre's OpenSSH signing key: the signature,
over every file of the app as `flwr run` packs it, is written into the folder as
fedprompt-app.sig.json and travels with every run. Each hospital's SuperNode runs the app only if
a key its /etc/fedprompt/trusted-apps lists signed exactly these files, so sign again after any
change to the folder (server/start-run.sh refuses an unsigned or changed app).

It also builds the signed app bundle (.fab) into --out: send it to the hospitals, who review it
(fedprompt site review-app FAB) before they list your key.

Who holds KEY: the person at the centre who answers for what runs at the hospitals; keep it off
the SuperLink's machine if you can, with a passphrase. Anyone with KEY can make every hospital
run code.

Options:
  --key FILE        the centre's private signing key (KEY.pub beside it)
  --new-key         make KEY first (ssh-keygen -t ed25519; it asks for a passphrase)
  --no-passphrase   with --new-key: no passphrase (for tests and throwaway federations only)
  --app DIR         the app folder to sign (default: server/app)
  --out DIR         where to write the signed .fab (default: the current folder)
  -h, --help        this text
TXT
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
key="" new_key=0 passphrase=1 app="$here/app" out="."
while [[ $# -gt 0 ]]; do
    case "$1" in
        --key) key="$2"; shift 2 ;;
        --new-key) new_key=1; shift ;;
        --no-passphrase) passphrase=0; shift ;;
        --app) app="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$key" ]]; then
    echo "error: give --key (see --help)" >&2
    exit 2
fi
# shellcheck source=server/common.sh
source "$here/common.sh"
fp_setup_flower
if ! command -v ssh-keygen >/dev/null; then
    echo "error: ssh-keygen is not installed; install OpenSSH's client tools (apt-get install openssh-client)." >&2
    exit 2
fi
if [[ "$new_key" == 1 ]]; then
    if [[ -e "$key" ]]; then
        echo "error: $key exists already; sign with it (drop --new-key), or choose another path." >&2
        exit 2
    fi
    mkdir -p "$(dirname "$key")"
    no_passphrase=()
    [[ "$passphrase" == 0 ]] && no_passphrase=(-N "")
    ssh-keygen -q -t ed25519 -C "centre@fedprompt" "${no_passphrase[@]}" -f "$key"
fi
fp_require_file "$key" "make it with server/sign-app.sh --key $key --new-key."
fp_require_file "$key.pub" "it is the public half ssh-keygen wrote beside $key."

"$FP_PYTHON" -m fedprompt.federation.app_approval sign "$app" --key "$key" --fab-out "$out"
read -r key_type key_data _ <"$key.pub"
echo "Each hospital adds this line to /etc/fedprompt/trusted-apps (compare the fingerprint above by phone):"
echo "centre@fedprompt namespaces=\"fedprompt-app\" $key_type $key_data"
