#!/usr/bin/env bash
# Try the cluster path on one machine: a multi-node Ray cluster (a head with 0 CPUs, as in
# cluster/aws.yaml, plus three worker nodes started with `ray start --address` in their own processes),
# a local S3-compatible server (moto) holding the shards, the stage cache (artifact_root) and MLflow's
# artifact store, and the pipeline submitted with `ray job submit --working-dir`.
#
#   bash scripts/local_cluster.sh up        # S3 + shards, MLflow, Ray head and worker nodes
#   bash scripts/local_cluster.sh submit    # the tiny pipeline as a Ray job (extra args go to full.py)
#   bash scripts/local_cluster.sh lose-node gpu_h100x8-0   # SIGKILL one worker node, as a lost machine
#   bash scripts/local_cluster.sh down      # stop everything
#
# Node types (scaled down from cluster/aws.yaml): `cpu_ingest` (2 CPUs, resource cpu_ingest) runs
# the relevance actors; two `gpu_h100x8` nodes (3 CPUs each, the logical resource
# accelerator_type:H100, no real GPU; node names gpu_h100x8-0 and -1) run the training workers. The
# config pins them there with relevance.resources / train.resources. The stage cache is the bucket
# (artifact_root=s3://zoomvit/artifacts): every stage's output, and its training checkpoints beside it,
# so a lost node's run resumes on the other one and no node's disk holds a result. Each node's
# ZOOMVIT_HOME (where a driver stages outputs before uploading them) is under the state dir. S3
# credentials live in the nodes' environment, not in the job's runtime env (which Ray's dashboard and
# Jobs API show). Every node has its own temp dir (/tmp/ray-$RAY_PORT-<node>, the head's
# /tmp/ray-$RAY_PORT-head) and ports (none on Ray's defaults, which another Ray here may hold), and
# `down` stops exactly those nodes' processes (python -m zoomvit.own_ray), never `ray stop`, which
# would stop every Ray on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
state="${ZOOMVIT_CLUSTER_DIR:-$repo/.local-cluster}"
config="${CONFIG:-pipelines/configs/tiny.yaml}"
mkdir -p "$state"
ports="$state/ports.env"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # url, what, [header]: until the url answers 200 (90 s at most)
  python3 - "$@" <<'PY' && return 0
import sys, time, urllib.request
url, headers = sys.argv[1], dict([sys.argv[3].split(": ", 1)] if len(sys.argv) > 3 else [])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=3) as response:
            if response.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(1)
PY
  echo "$2 did not come up ($1)" >&2; return 1
}
detached() {  # command...: in the background, in a session of its own (setsid, which macOS lacks)
  nohup python3 -c 'import os, sys
os.setsid()
os.execvp(sys.argv[1], sys.argv[1:])' "$@" &
}

export AWS_ACCESS_KEY_ID=zoomvit-local AWS_SECRET_ACCESS_KEY=zoomvit-local AWS_DEFAULT_REGION=us-east-1
auth=()
if [ -f "$HOME/.ray/auth_token" ]; then
  export RAY_AUTH_MODE=token
  auth=("Authorization: Bearer $(cat "$HOME/.ray/auth_token")")
fi

case "${1:-}" in
up)
  if [ -f "$ports" ]; then echo "already up ($ports); run 'down' first" >&2; exit 1; fi
  S3_PORT=$(free_port); MLFLOW_PORT=$(free_port); RAY_PORT=$(free_port); DASHBOARD_PORT=$(free_port)
  printf 'S3_PORT=%s\nMLFLOW_PORT=%s\nRAY_PORT=%s\nDASHBOARD_PORT=%s\n' \
    "$S3_PORT" "$MLFLOW_PORT" "$RAY_PORT" "$DASHBOARD_PORT" >"$ports"
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
  export ZOOMVIT_HOME="$state/home"

  detached python3 -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$state/s3.log" 2>&1
  echo $! >"$state/s3.pid"
  wait_for "$AWS_ENDPOINT_URL/moto-api/" "the S3 server"
  python3 - "$config" "$state" <<'PY'
import sys, tempfile
from pathlib import Path
import boto3, s3fs
from zoomvit.config import load_config
from zoomvit.data.demo import generate_demo_dataset

config, state = load_config(sys.argv[1]), Path(sys.argv[2])
boto3.client("s3").create_bucket(Bucket="zoomvit")
demo = config.data.demo
local = Path(tempfile.mkdtemp(dir=state, prefix="shards-"))
generate_demo_dataset(local, train=demo.train, val=demo.val, image_size=demo.image_size,
                      samples_per_shard=demo.samples_per_shard, seed=demo.seed)
s3fs.S3FileSystem().put(f"{local}/", "zoomvit/shards/", recursive=True)
print(f"shards: s3://zoomvit/shards ({len(list(local.iterdir()))} files)")
PY

  MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=$MLFLOW_PORT MLFLOW_STATE_DIR="$state/mlflow" \
    MLFLOW_BACKEND_STORE_URI="sqlite:///$state/mlflow/mlflow.db" \
    MLFLOW_ARTIFACTS_DESTINATION=s3://zoomvit/mlflow bash mlflow/serve.sh --daemon

  ray start --head --port="$RAY_PORT" --node-ip-address=127.0.0.1 --num-cpus=0 --temp-dir="/tmp/ray-$RAY_PORT-head" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$(free_port)" \
    --dashboard-agent-listen-port="$(free_port)" --disable-usage-stats >"$state/head.log" 2>&1
  # Each node keeps its own temp dir, as separate machines would: nodes sharing one would unpack the
  # job's working dir over each other's, deleting the driver's current directory under it.
  node() {  # name, CPUs, resources
    ray start --address="127.0.0.1:$RAY_PORT" --node-ip-address=127.0.0.1 --node-name="$1" --num-cpus="$2" \
      --resources="$3" --object-store-memory=300000000 --temp-dir="/tmp/ray-$RAY_PORT-$1" \
      --dashboard-agent-listen-port="$(free_port)" >"$state/node-$1.log" 2>&1
  }
  node cpu_ingest 2 '{"cpu_ingest": 2}'
  node gpu_h100x8-0 3 '{"accelerator_type:H100": 1}'
  node gpu_h100x8-1 3 '{"accelerator_type:H100": 1}'
  wait_for "http://127.0.0.1:$DASHBOARD_PORT/api/version" "Ray's dashboard" "${auth[@]}"
  echo "up: Ray http://127.0.0.1:$DASHBOARD_PORT, MLflow http://127.0.0.1:$MLFLOW_PORT, S3 http://127.0.0.1:$S3_PORT"
  ;;
submit)
  shift
  # shellcheck disable=SC1090
  source "$ports"
  # this checkout's git commit travels in the job's env (the working-dir copy has no .git)
  runtime_env=$(python3 -m zoomvit runtime-env --env RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 --env RAY_DATA_LOG_LEVEL=WARNING)
  ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . --runtime-env-json "$runtime_env" \
    -- python pipelines/full.py --config "$config" \
       --set data.root=s3://zoomvit/shards --set data.demo=null \
       --set "tracking.uri=http://127.0.0.1:$MLFLOW_PORT" --set artifact_root=s3://zoomvit/artifacts \
       --set 'relevance.resources={cpu_ingest: 1}' \
       --set 'teacher.train.resources={"accelerator_type:H100": 0.01}' \
       --set 'zoomer.train.resources={"accelerator_type:H100": 0.01}' \
       --set 'zoomvit.train.resources={"accelerator_type:H100": 0.01}' \
       --set 'baseline.train.resources={"accelerator_type:H100": 0.01}' "$@"
  ;;
lose-node)
  # shellcheck disable=SC1090
  source "$ports"
  name="${2:?which node: cpu_ingest, gpu_h100x8-0 or gpu_h100x8-1}"
  # the node's raylet, object store and workers: every process started with its temp dir
  pkill -KILL -f -- "/tmp/ray-$RAY_PORT-$name/" || { echo "no processes of node $name" >&2; exit 1; }
  echo "lost node $name"
  ;;
down)
  if [ -f "$ports" ]; then
    # shellcheck disable=SC1090
    source "$ports"
    nodes=("/tmp/ray-$RAY_PORT-head" "/tmp/ray-$RAY_PORT-cpu_ingest" "/tmp/ray-$RAY_PORT-gpu_h100x8-0" "/tmp/ray-$RAY_PORT-gpu_h100x8-1")
    python3 -m zoomvit.own_ray stop "${nodes[@]}" || true
    MLFLOW_PORT=$MLFLOW_PORT MLFLOW_STATE_DIR="$state/mlflow" bash mlflow/serve.sh --stop || true
    rm -rf "${nodes[@]}"
  fi
  if [ -f "$state/s3.pid" ]; then kill -TERM -- "-$(cat "$state/s3.pid")" 2>/dev/null || true; rm -f "$state/s3.pid"; fi
  rm -f "$ports"
  echo "down"
  ;;
*)
  sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
