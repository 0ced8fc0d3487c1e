#!/usr/bin/env bash
# The demo end to end on one machine: install, start an MLflow server and a Ray head on 127.0.0.1,
# submit the pipeline with `ray job submit`, print where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
config="${CONFIG:-pipelines/configs/demo.yaml}"

python3 -m pip install --quiet -e .
if [ -f "$HOME/.ray/auth_token" ]; then export RAY_AUTH_MODE=token; fi

export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
if ! curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null; then
  bash mlflow/serve.sh --daemon
fi
if ! ray status >/dev/null 2>&1; then
  ray start --head --dashboard-host 127.0.0.1 --disable-usage-stats >/dev/null
  echo "Ray head started (dashboard http://127.0.0.1:8265)"
fi

start=$(date +%s)
# One machine cannot be preempted: Ray Train's preemption watcher (an extra process per training
# stage) stays off here; clusters with spot nodes keep it.
ray job submit --address http://127.0.0.1:8265 --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://127.0.0.1:$MLFLOW_PORT\", \"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER\": \"0\", \"RAY_DATA_LOG_LEVEL\": \"WARNING\"}}" \
  -- python pipelines/full.py --config "$config" \
     --set "data.root=$repo/demo_data/$(basename "$config" .yaml)" --set "artifact_root=$repo/runs" "$@"
echo
echo "Finished in $(( $(date +%s) - start )) s."
echo "MLflow UI: http://127.0.0.1:$MLFLOW_PORT/#/experiments?workflowType=machine_learning  -> experiment 'zoomvit'"
echo "  (the 'Model training' switch at the top left; the job's summary above links the parent run directly):"
echo "  - the newest parent run holds lineage.png (the stage DAG), config.yaml, frontier.png and top1_by_size.png;"
echo "  - its 'evaluate' run holds zoom_layouts.png and the ZoomViT vs baseline metrics;"
echo "  - Model registry: zoomvit-zoomvit and zoomvit-baseline, alias 'candidate' = the versions evaluated;"
echo "  - filter with  tags.stage = 'zoomvit'  and tick two runs -> Compare."
echo "Stop the services with: ray stop; bash mlflow/serve.sh --stop"
