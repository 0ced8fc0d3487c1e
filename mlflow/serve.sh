#!/usr/bin/env bash
# Run the MLflow tracking server for the pipeline.
#   bash mlflow/serve.sh            # foreground
#   bash mlflow/serve.sh --daemon   # background; pid in $MLFLOW_STATE_DIR/server.pid, log beside it
# Settings come from mlflow/mlflow.env, overridable from the environment. The default store is
# sqlite + a local artifact folder; artifacts are served through the server (--serve-artifacts),
# so Ray workers on other nodes need only the server's URL, not a shared disk.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/mlflow.env" ]; then
  while IFS='=' read -r key value; do
    case "$key" in ''|\#*) continue ;; esac
    [ -n "${!key:-}" ] || export "$key=$(eval echo "$value")"
  done < "$here/mlflow.env"
fi
mkdir -p "$MLFLOW_STATE_DIR"
args=(server --host "$MLFLOW_HOST" --port "$MLFLOW_PORT"
      --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
      --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts
      --workers "${MLFLOW_WORKERS:-1}")
if [ "${1:-}" = "--daemon" ]; then
  nohup mlflow "${args[@]}" >"$MLFLOW_STATE_DIR/server.log" 2>&1 &
  echo $! >"$MLFLOW_STATE_DIR/server.pid"
  for _ in $(seq 1 60); do
    if curl -sf "http://$MLFLOW_HOST:$MLFLOW_PORT/health" >/dev/null; then
      echo "MLflow server on http://$MLFLOW_HOST:$MLFLOW_PORT (pid $(cat "$MLFLOW_STATE_DIR/server.pid"))"
      exit 0
    fi
    sleep 1
  done
  echo "MLflow server did not come up; see $MLFLOW_STATE_DIR/server.log" >&2
  exit 1
fi
exec mlflow "${args[@]}"
