#!/usr/bin/env bash
# The main job on the embedded default (`make demo`): a local Ray head on loopback, stage 1 of the
# search submitted with `ray job submit` on the tiny preset (synthetic scenes, tiny model), the best
# configuration printed through the retrieval API, the head stopped again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export RAY_AUTH_MODE=token RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
NAME=${NAME:-demo-stage1-$(date +%Y%m%d-%H%M%S)}

tune_jobs/local_head.sh start "${DEMO_CPUS:-2}"
trap 'tune_jobs/local_head.sh stop' EXIT
"$BIN/ray" job submit --address "http://127.0.0.1:$RAY_DASHBOARD_PORT" \
  --runtime-env tune_jobs/runtime_env.yaml \
  -- "$PWD/$BIN/python" tune_jobs/stage1.py --preset tiny --base-dir "$PWD" --name "$NAME" train.progress=false

echo
echo "== best configuration, through the retrieval API (rsilora best runs/tune/$NAME) =="
"$BIN/rsilora" best "runs/tune/$NAME" | tail -n 3
echo
echo "experiment:   $PWD/runs/tune/$NAME"
echo "TensorBoard:  $BIN/tensorboard --logdir runs/tune/$NAME --host 127.0.0.1"
echo "export:       $BIN/rsilora export-best runs/tune/$NAME --out runs/best-adapter"
