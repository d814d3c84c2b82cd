#!/usr/bin/env bash
# The main job on the embedded default (`make demo`): a local Ray head on loopback, stage 1 of the
# search submitted with `ray job submit` on the tiny preset (synthetic scenes, tiny model), the best
# configuration printed through the retrieval API, the head stopped; then the best adapter is
# evaluated against the zero-shot baselines on the synthetic RSIEval-format test set (bootstrap
# CIs) and the report is written.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export RAY_AUTH_MODE=token RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
NAME=${NAME:-demo-stage1-$(date +%Y%m%d-%H%M%S)}

tune_jobs/local_head.sh start "${DEMO_CPUS:-2}"
trap 'tune_jobs/local_head.sh stop' EXIT
"$BIN/ray" job submit --address "http://127.0.0.1:$RAY_DASHBOARD_PORT" \
  --runtime-env tune_jobs/runtime_env.yaml \
  -- "$(cd "$BIN" && pwd)/python" tune_jobs/stage1.py --preset tiny --base-dir "$PWD" --name "$NAME" train.progress=false

echo
echo "== best configuration, through the retrieval API (rsilora best runs/tune/$NAME) =="
"$BIN/rsilora" best "runs/tune/$NAME" | tail -n 3
tune_jobs/local_head.sh stop
trap - EXIT

echo
echo "== evaluation on the synthetic RSIEval-format test set =="
"$BIN/rsilora" compare --preset tiny --data data/synthetic/RSIEval --experiment "runs/tune/$NAME" \
  --blip2 ./models/tiny-blip2 --out "runs/eval/$NAME"
"$BIN/rsilora" report "runs/tune/$NAME" --eval "runs/eval/$NAME" --out "results/$NAME"

echo
echo "experiment:   $PWD/runs/tune/$NAME   (TensorBoard: $BIN/tensorboard --logdir runs/tune/$NAME --host 127.0.0.1)"
echo "evaluation:   $PWD/runs/eval/$NAME"
echo "report:       $PWD/results/$NAME/report.md"
