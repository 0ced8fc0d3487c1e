#!/usr/bin/env bash
# The demo end to end on one machine: install, start an MLflow server on 127.0.0.1 and, unless
# `ray status` reaches a Ray cluster already, a Ray head; submit the pipeline with `ray job submit` to
# that cluster's dashboard, print where to look. The set-up is scripts/_setup.sh's, as in
# scripts/test.sh: Linux, and within its first seconds what the demo needs later (a C++ compiler and
# the Python headers for DeepSpeed's CPU op, disk for the install, MLflow's port $MLFLOW_PORT, default
# 5000, free or already MLflow's), each missing piece named with its install command; the active
# virtual environment, else .venv in the checkout, created from Python >= 3.11; the package installed
# there when anything is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
config="${CONFIG:-pipelines/configs/demo.yaml}"
ZV_NAME=demo.sh
. scripts/_setup.sh

export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
zv_platform
zv_prereqs "$MLFLOW_PORT"
zv_venv  # and on PATH from here: python3, ray and mlflow are the environment's
zv_install
if [ -f "$HOME/.ray/auth_token" ]; then export RAY_AUTH_MODE=token; fi

if ! zv_http_ok "http://127.0.0.1:$MLFLOW_PORT/health"; then
  bash mlflow/serve.sh --daemon
fi
if ray status >/dev/null 2>&1; then
  found="Ray cluster found"
else
  unset RAY_ADDRESS  # none reachable there: the job goes to the head started here
  ray start --head --dashboard-host 127.0.0.1 --disable-usage-stats >/dev/null
  found="Ray head started"
fi
# The job-submission (dashboard) address of that cluster, as `ray job` finds it: $RAY_API_SERVER_ADDRESS,
# else $RAY_ADDRESS, else the local cluster, its dashboard's address read from the cluster itself.
dashboard=$(python3 -c 'from ray.dashboard.utils import get_address_for_submission_client as a; print(a(None))' | tail -n 1) ||
  zv_die "could not read the dashboard address of the Ray cluster (see above)"
echo "$found (dashboard $dashboard)"

# The job's environment: this checkout's git commit (the working-dir copy travels without .git), the
# tracking server; one machine cannot be preempted, so Ray Train's preemption watcher (an extra process
# per training stage) stays off here, where clusters with spot nodes keep it.
runtime_env=$(python3 -m zoomvit runtime-env --env "MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT" \
  --env RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 --env RAY_DATA_LOG_LEVEL=WARNING)
start=$(date +%s)
ray job submit --address "$dashboard" --working-dir . --runtime-env-json "$runtime_env" \
  -- python3 pipelines/full.py --config "$config" \
     --set "data.root=$repo/demo_data/$(basename "$config" .yaml)" --set "artifact_root=$repo/runs" "$@"
echo
echo "Finished in $(( $(date +%s) - start )) s."
echo "MLflow UI: http://127.0.0.1:$MLFLOW_PORT/#/experiments?workflowType=machine_learning  -> experiment 'zoomvit'"
echo "  (the 'Model training' switch at the top left; the job's summary above links the parent run directly):"
echo "  - the newest parent run holds lineage.png (the stage DAG), config.yaml, frontier.png and top1_by_size.png;"
echo "  - its 'evaluate' run holds zoom_layouts.png and the ZoomViT vs baseline metrics;"
echo "  - Model registry: zoomvit-zoomvit and zoomvit-baseline, alias 'candidate' = the versions evaluated;"
echo "  - filter with  tags.stage = 'zoomvit'  and tick two runs -> Compare."
if [ "$found" = "Ray head started" ]; then
  echo "Stop the services with: bash mlflow/serve.sh --stop; ray stop  (ray stop ends every Ray on this machine)"
else
  echo "Stop the MLflow server with: bash mlflow/serve.sh --stop  (the Ray cluster was there before; it is left running)"
fi
