#!/usr/bin/env bash
# Start the federation's SuperLink (TLS, SuperNode authentication) on this machine's loopback and,
# in front of it, nginx on the sites' port, passing only what SuperNodes call (foreground).
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/start-superlink.sh --certs DIR [--host ADDRESS] [--port PORT]
                                 [--control-port PORT] [--state DIR]

Starts two processes and stops both when stopped (Ctrl-C, SIGTERM) or when either stops:
  - flower-superlink, with TLS and SuperNode authentication (only SuperNodes whose key was
    registered with server/register-site.sh may join), listening on 127.0.0.1:CONTROL_PORT only.
    Operators reach its Control API there, from this machine: server/register-site.sh,
    server/start-run.sh, flwr ls; from elsewhere through ssh -L CONTROL_PORT:127.0.0.1:CONTROL_PORT.
  - nginx, on HOST:PORT with the federation's certificate: the sites' port. It passes only the
    SuperNodes' Fleet API (/v1/fleet/...) to the SuperLink and answers anything else (flwr run,
    flwr supernode register, ...) with 403.
Run it under systemd or tmux, as an unprivileged account (ports above 1024 need no root).

Options:
  --certs DIR          folder with ca.pem, server.pem and server.key (server/make-certificates.sh)
  --host ADDR          address the sites' port listens on (default 0.0.0.0: every interface)
  --port PORT          the sites' HTTPS port (default 9092; open it in the firewall)
  --control-port PORT  the SuperLink's own port on 127.0.0.1 (default 9091; keep it closed)
  --state DIR          folder for the SuperLink's database (registered sites, runs) and nginx's
                       config, pid and logs (default: state/ beside --certs)
  -h, --help           this text
TXT
}

certs="" host="0.0.0.0" port=9092 control_port=9091 state=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --certs) certs="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --control-port) control_port="$2"; shift 2 ;;
        --state) state="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$certs" ]]; then
    echo "error: give --certs DIR (see --help)" >&2
    exit 2
fi
if [[ "$port" == "$control_port" ]]; then
    echo "error: --port and --control-port must differ (the sites' port and the SuperLink's own)." >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=server/common.sh
source "$here/common.sh"
fp_setup_flower
# FEDPROMPT_NGINX: an nginx outside PATH and /usr/sbin.
nginx="${FEDPROMPT_NGINX:-$(PATH="$PATH:/usr/sbin:/sbin" command -v nginx || true)}"
if [[ ! -x "$nginx" ]]; then
    echo "error: nginx is not installed; install it (apt-get install nginx-light, or nginx) and run this again." >&2
    exit 2
fi
for file in ca.pem server.pem server.key; do
    fp_require_file "$certs/$file" "make it with server/make-certificates.sh --out $certs --host <name or address>."
done
certs="$(cd "$certs" && pwd)"
san="$(openssl x509 -in "$certs/server.pem" -noout -ext subjectAltName 2>/dev/null || true)"
if [[ "$san" != *"DNS:localhost"* || "$san" != *"IP Address:127.0.0.1"* ]]; then
    echo "error: $certs/server.pem lacks localhost and 127.0.0.1, which nginx uses to reach the SuperLink; renew it with server/make-certificates.sh --out $certs and your --host values (the CA is kept)." >&2
    exit 2
fi
state="${state:-$certs/../state}"
mkdir -p "$state/nginx/temp"
state="$(cd "$state" && pwd)"

# nginx's config from the template; a root master drops its workers to nobody.
listen="$host:$port"
[[ "$host" == *:* ]] && listen="[$host]:$port"
user_line=""
[[ "$(id -u)" == 0 ]] && user_line="user nobody $(id -gn nobody 2>/dev/null || echo nogroup);"
config="$(<"$here/nginx.conf.template")"
config="${config//@USER@/"$user_line"}"
config="${config//@NGINX_DIR@/"$state/nginx"}"
config="${config//@LISTEN@/"$listen"}"
config="${config//@CERTS@/"$certs"}"
config="${config//@INTERNAL_PORT@/"$control_port"}"
printf '%s\n' "$config" >"$state/nginx/nginx.conf"

if (exec 3<>"/dev/tcp/127.0.0.1/$control_port") 2>/dev/null; then
    echo "error: 127.0.0.1:$control_port is already in use (address already in use); stop what listens there or choose another --control-port." >&2
    exit 1
fi

superlink_pid="" nginx_pid=""
stop() {
    trap - EXIT INT TERM
    for pid in $nginx_pid $superlink_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

flower-superlink \
    --ssl-ca-certfile "$certs/ca.pem" \
    --ssl-certfile "$certs/server.pem" \
    --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --host 127.0.0.1 \
    --port "$control_port" \
    --database "$state/superlink.db" \
    --disable-runtime-dependency-installation &
superlink_pid=$!
# nginx starts once the SuperLink answers, so that the sites never see a half-started centre.
until (exec 3<>"/dev/tcp/127.0.0.1/$control_port") 2>/dev/null; do
    if ! kill -0 "$superlink_pid" 2>/dev/null; then
        status=0
        wait "$superlink_pid" || status=$?
        echo "error: the SuperLink stopped before it opened 127.0.0.1:$control_port (its log above says why)." >&2
        exit "$(( status == 0 ? 1 : status ))"
    fi
    sleep 0.2
done
"$nginx" -p "$state/nginx" -c "$state/nginx/nginx.conf" -e stderr -g "daemon off;" &
nginx_pid=$!
echo "fedprompt: sites connect to $listen (nginx: Fleet API only); operators use the Control API on 127.0.0.1:$control_port with $certs/ca.pem."

status=0
wait -n "$superlink_pid" "$nginx_pid" || status=$?
if ! kill -0 "$nginx_pid" 2>/dev/null; then
    echo "error: nginx stopped (its log above says why); stopping the SuperLink too." >&2
else
    echo "error: the SuperLink stopped; stopping nginx too." >&2
fi
exit "$(( status == 0 ? 1 : status ))"
