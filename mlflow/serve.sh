#!/usr/bin/env bash
# Run the MLflow tracking server for the pipeline.
#   bash mlflow/serve.sh            # foreground
#   bash mlflow/serve.sh --daemon   # background; pid in $MLFLOW_STATE_DIR/server.pid, log beside it
#   bash mlflow/serve.sh --stop     # stop the background server (its whole process group)
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
if [ "${1:-}" = "--stop" ]; then
  pidfile="$MLFLOW_STATE_DIR/server.pid"
  [ -f "$pidfile" ] || { echo "no $pidfile: nothing to stop" >&2; exit 1; }
  kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || true
  rm -f "$pidfile"
  exit 0
fi
args=(server --host "$MLFLOW_HOST" --port "$MLFLOW_PORT"
      --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
      --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts
      --workers "${MLFLOW_WORKERS:-1}")
# MLflow 3 answers only Host headers of localhost and private IPs unless told more: a server reached
# by a service name (http://zoomvit-mlflow:5000 in Kubernetes) lists it here.
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"); fi
health=(curl -sf "http://$MLFLOW_HOST:$MLFLOW_PORT/health")
if [ "${MLFLOW_AUTH:-none}" = "basic" ]; then
  # MLflow's basic-auth app: users and permissions in their own database; the admin account is
  # created from these two variables on first start. Clients set MLFLOW_TRACKING_USERNAME/PASSWORD.
  : "${MLFLOW_AUTH_ADMIN_USERNAME:?MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_USERNAME}"
  : "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD}"
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    [ -f "$MLFLOW_STATE_DIR/secret_key" ] || (umask 077; python3 -c "import secrets; print(secrets.token_hex(32))" >"$MLFLOW_STATE_DIR/secret_key")
    export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$MLFLOW_STATE_DIR/secret_key")"
  fi
  export MLFLOW_AUTH_CONFIG_PATH="$MLFLOW_STATE_DIR/basic_auth.ini"
  (umask 077; cat >"$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$MLFLOW_STATE_DIR/basic_auth.db}
admin_username = $MLFLOW_AUTH_ADMIN_USERNAME
admin_password = $MLFLOW_AUTH_ADMIN_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
)
  args+=(--app-name basic-auth)
fi
if [ "${1:-}" = "--daemon" ]; then
  setsid nohup mlflow "${args[@]}" >"$MLFLOW_STATE_DIR/server.log" 2>&1 &
  echo $! >"$MLFLOW_STATE_DIR/server.pid"
  for _ in $(seq 1 60); do
    if "${health[@]}" >/dev/null; then
      echo "MLflow server on http://$MLFLOW_HOST:$MLFLOW_PORT (pid $(cat "$MLFLOW_STATE_DIR/server.pid"))"
      exit 0
    fi
    sleep 1
  done
  echo "MLflow server did not come up; see $MLFLOW_STATE_DIR/server.log" >&2
  exit 1
fi
exec mlflow "${args[@]}"
