#!/usr/bin/env bash
# Start (or resume) a federated run on the deployed SuperLink and follow its log.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: server/start-run.sh --superlink HOST:PORT --ca ca.pem --output DIR --sites N
                           [--experiment NAME] [--rounds N] [--min-sites N] [--resume]
                           [--connection NAME] [-- HYDRA_OVERRIDES...]

Submits fedprompt's ServerApp and ClientApp (server/app) to the SuperLink in deployment mode:
each site trains on its own images and only prompt tensors and scalar metrics come back. The
results folder is written on the machine the SuperLink runs on. The command streams the run's
log and returns when the run ends.

Options:
  --output DIR        results folder on the SuperLink's machine (absolute path)
  --sites N           how many sites the run waits for (federation.num_sites)
  --min-sites N       start without the others once federation.connect_timeout has passed, and
                      keep going while at least N sites remain (default 1)
  --experiment NAME   the experiment whose model and settings to use (default quickstart)
  --rounds N          rounds (federation.rounds; raise it with --resume to run more)
  --resume            continue the run in --output from its last completed round
  --superlink H:P     the SuperLink's address; --ca: the federation's ca.pem
  --connection NAME   the flwr connection to write and use (default fedprompt)
  -- OVERRIDES        any further fedprompt keys, e.g. -- strategy=fedmedian train.shots=16
  -h, --help          this text
TXT
}

superlink="" ca="" output="" sites="" min_sites=1 experiment="quickstart" rounds=""
connection="fedprompt" resume=0
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --superlink) superlink="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        --sites) sites="$2"; shift 2 ;;
        --min-sites) min_sites="$2"; shift 2 ;;
        --experiment) experiment="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --resume) resume=1; shift ;;
        --connection) connection="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$superlink" || -z "$ca" || -z "$output" || -z "$sites" ]]; then
    echo "error: give --superlink, --ca, --output and --sites (see --help)" >&2
    exit 2
fi
if [[ "$output" != /* ]]; then
    echo "error: --output must be an absolute path on the SuperLink's machine, got $output" >&2
    exit 2
fi

# shellcheck source=server/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
fp_setup_flower
fp_require_file "$ca" "it is the ca.pem server/make-certificates.sh made."
fp_write_connection "$connection" "$superlink" "$ca"

overrides=(federation.mode=deployment "federation.num_sites=$sites" "federation.min_sites=$min_sites")
[[ -n "$rounds" ]] && overrides+=("federation.rounds=$rounds")
[[ "$resume" == 1 ]] && overrides+=("resume=$output")
overrides+=("${extra[@]}")

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
app="$(cd "$(dirname "${BASH_SOURCE[0]}")/app" && pwd)"
flwr run "$app" "$connection" --run-config "$run_config" --stream
