#!/usr/bin/env bash
# Run the MLflow tracking server for the pipeline.
#   bash mlflow/serve.sh            # foreground
#   bash mlflow/serve.sh --daemon   # background; pid in $MLFLOW_STATE_DIR/server.pid, log beside it
#   bash mlflow/serve.sh --stop     # stop the background server (its whole process group)
# Settings come from mlflow/mlflow.env, overridable from the environment. The default store is
# sqlite + a local artifact folder; artifacts are served through the server (--serve-artifacts),
# so Ray workers on other nodes need only the server's URL, not a shared disk. Needs mlflow and a
# python3 on PATH (the health check, the daemon's own session: no curl, no setsid); a port another
# program holds is named before anything starts.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py=$(command -v python3 || command -v python) || { echo "mlflow/serve.sh needs python3 on PATH" >&2; exit 1; }
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
url="http://$MLFLOW_HOST:$MLFLOW_PORT"
case "$MLFLOW_HOST" in 0.0.0.0 | "::" | "[::]") url="http://127.0.0.1:$MLFLOW_PORT" ;; esac  # where it answers
healthy() {  # SECONDS [PID]: MLflow answers $url/health within SECONDS; 2 as soon as process PID is gone
  "$py" - "$url/health" "$1" "${2:-}" <<'PY'
import os, sys, time, urllib.request
url, deadline, pid = sys.argv[1], time.monotonic() + float(sys.argv[2]), sys.argv[3]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    try:
        with opener.open(url, timeout=min(3, max(1, deadline - time.monotonic()))) as response:
            if response.status == 200:
                sys.exit(0)
    except Exception:
        pass
    if pid:
        try:
            with open(f"/proc/{pid}/stat") as stat:  # Linux: a zombie counts as gone
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    sys.exit(2)
        except FileNotFoundError:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                sys.exit(2)
    if time.monotonic() >= deadline:
        sys.exit(1)
    time.sleep(0.5)
PY
}
port_taken() {  # whether another program answers on, or holds, $MLFLOW_HOST:$MLFLOW_PORT
  ! "$py" - "$MLFLOW_HOST" "$MLFLOW_PORT" <<'PY'
import errno, socket, sys
host, port = sys.argv[1].strip("[]"), int(sys.argv[2])
try:  # something answers there
    socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=1).close()
    sys.exit(1)
except OSError:
    pass
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:  # as the server binds
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:  # only a port in use counts; anything else is the server's to report
        sys.exit(1 if e.errno == errno.EADDRINUSE else 0)
PY
}
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
if port_taken; then
  if healthy 0; then
    echo "an MLflow server already answers on $url: not starting another" >&2
    [ "${1:-}" = "--daemon" ] && exit 0
  else
    echo "port $MLFLOW_PORT on $MLFLOW_HOST is taken by another program (on macOS the AirPlay receiver holds" \
      "5000): set MLFLOW_PORT to a free port and run again" >&2
  fi
  exit 1
fi
if [ "${1:-}" = "--daemon" ]; then
  # in a session of its own (what setsid does; macOS has no setsid), so that --stop ends its whole group
  nohup "$py" -c 'import os, sys
try:
    os.setsid()
except OSError:
    pass  # already a group leader: its group is its own
os.execvp(sys.argv[1], sys.argv[1:])' mlflow "${args[@]}" >"$MLFLOW_STATE_DIR/server.log" 2>&1 &
  pid=$!
  echo "$pid" >"$MLFLOW_STATE_DIR/server.pid"
  if healthy 60 "$pid"; then
    echo "MLflow server on http://$MLFLOW_HOST:$MLFLOW_PORT (pid $pid)"
    exit 0
  fi
  echo "MLflow server did not come up on $url (see $MLFLOW_STATE_DIR/server.log):" >&2
  tail -n 5 "$MLFLOW_STATE_DIR/server.log" >&2 || true
  exit 1
fi
exec mlflow "${args[@]}"
