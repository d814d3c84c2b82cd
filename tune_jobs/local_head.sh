#!/usr/bin/env bash
# Start or stop a one-machine Ray head for `ray job submit`, secure by default:
# dashboard + jobs API on 127.0.0.1 only, token authentication on (a token is generated once in
# ~/.ray/auth_token if missing). Clients need RAY_AUTH_MODE=token in their environment.
#
#   tune_jobs/local_head.sh start [NUM_CPUS]     # prints the address to submit to
#   tune_jobs/local_head.sh stop
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
GCS_PORT=${RAY_GCS_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
export RAY_AUTH_MODE=token

case "${1:-}" in
  start)
    [ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || "$BIN/ray" get-auth-token --generate >/dev/null
    "$BIN/ray" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
      --port="$GCS_PORT" --dashboard-port="$DASHBOARD_PORT" --num-cpus="${2:-$(nproc)}" \
      --disable-usage-stats >/dev/null
    echo "Ray head up: dashboard and jobs API at http://127.0.0.1:$DASHBOARD_PORT (token auth on)"
    ;;
  stop)
    "$BIN/ray" stop --force >/dev/null 2>&1 || true
    ;;
  *)
    echo "usage: $0 start [NUM_CPUS] | stop" >&2
    exit 2
    ;;
esac
