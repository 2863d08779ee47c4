#!/usr/bin/env bash
# Start (or resume) a federated run on the deployed SuperLink and follow its log.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/start-run.sh --ca ca.pem --output DIR --sites N [--control HOST:PORT]
                           [--experiment NAME] [--rounds N] [--min-sites N] [--resume]
                           [--connection NAME] [--app DIR] [-- HYDRA_OVERRIDES...]

Submits fedprompt's ServerApp and ClientApp (server/app) to the SuperLink in deployment mode:
each site trains on its own images and only prompt tensors and scalar metrics come back. The
results folder is written on the machine the SuperLink runs on. The command streams the run's
log and returns when the run ends: status 0 only when the run completed (summary.json says
"status": "completed"), 1 when it failed, with the reason. Every registered site is on the
run's roster, so a site offline when a round starts is listed as missing in that round.

Sites run only an app the centre signed: an unsigned server/app, or one changed since it was
signed, is refused here before it is sent (sign it with server/sign-app.sh). Run it on the
SuperLink's machine: the Control API listens on its loopback only.

Options:
  --output DIR        results folder on the SuperLink's machine (absolute path)
  --sites N           how many sites the run waits for (federation.num_sites)
  --min-sites N       start without the others once federation.connect_timeout has passed, and
                      keep going while at least N sites remain (default 1)
  --experiment NAME   the experiment whose model and settings to use (default quickstart)
  --rounds N          rounds (federation.rounds; raise it with --resume to run more)
  --resume            continue the run in --output from its last completed round
  --ca FILE           the federation's ca.pem
  --control H:P       the SuperLink's Control API (default 127.0.0.1:9091)
  --connection NAME   the flwr connection to write and use (default fedprompt-centre)
  --app DIR           the signed app folder to submit (default: server/app)
  -- OVERRIDES        any further fedprompt keys, e.g. -- strategy=fedmedian train.shots=16
  -h, --help          this text
TXT
}

# shellcheck source=server/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
control="$FP_CONTROL_DEFAULT" ca="" output="" sites="" min_sites=1 experiment="quickstart"
rounds="" connection="$FP_CONNECTION_DEFAULT" resume=0 app="$(dirname "${BASH_SOURCE[0]}")/app"
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --control) control="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        --sites) sites="$2"; shift 2 ;;
        --min-sites) min_sites="$2"; shift 2 ;;
        --experiment) experiment="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --resume) resume=1; shift ;;
        --connection) connection="$2"; shift 2 ;;
        --app) app="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$ca" || -z "$output" || -z "$sites" ]]; then
    echo "error: give --ca, --output and --sites (see --help)" >&2
    exit 2
fi
if [[ "$output" != /* ]]; then
    echo "error: --output must be an absolute path on the SuperLink's machine, got $output" >&2
    exit 2
fi

fp_setup_flower
fp_require_file "$ca" "it is the ca.pem server/make-certificates.sh made."
app="$(cd "$app" && pwd)"
"$FP_PYTHON" -m fedprompt.federation.app_approval check "$app"
fp_write_connection "$connection" "$control" "$ca"

# Every registered site is on the run's roster: one not connected when a round starts is
# recorded as missing in that round's line, not silently absent.
# (Flower's client prints which SuperLink it uses first: the names are the last line.)
roster="$("$FP_PYTHON" "$(dirname "${BASH_SOURCE[0]}")/site_registry.py" "$connection" names | tail -n 1)"
overrides=(federation.mode=deployment "federation.num_sites=$sites" "federation.min_sites=$min_sites"
    "federation.sites=[$roster]")
[[ -n "$rounds" ]] && overrides+=("federation.rounds=$rounds")
[[ "$resume" == 1 ]] && overrides+=("resume=$output")
overrides+=("${extra[@]}")

# The whole configuration is checked here, before anything is submitted: a bad value is one
# sentence and exit status 2 (the ServerApp would refuse it too, after starting).
"$FP_PYTHON" -m fedprompt.cli config "$experiment" "${overrides[@]}" >/dev/null || exit 2

run_config="$(mktemp --suffix=.toml)"
trap 'rm -f "$run_config"' EXIT
"$FP_PYTHON" - "$run_config" "$experiment" "$output" "${overrides[@]}" <<'PY'
import shlex, sys
from pathlib import Path
import tomli_w
path, experiment, output, *overrides = sys.argv[1:]
config = {"experiment": experiment, "output_dir": output, "overrides": shlex.join(overrides)}
Path(path).write_text(tomli_w.dumps(config))
PY
flwr run "$app" "$connection" --run-config "$run_config" --stream
# flwr run exits 0 whatever became of the run: the run's own summary says whether it completed.
"$FP_PYTHON" - "$output/summary.json" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
summary = json.loads(path.read_text()) if path.is_file() else {}
if summary.get("status") == "completed":
    sys.exit(0)
reason = summary.get("reason") or "it wrote no summary; the log above says why"
print(f"error: the run did not complete: {reason}", file=sys.stderr)
sys.exit(1)
PY
