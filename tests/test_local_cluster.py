"""The cluster path on one machine (scripts/local_cluster.sh): a Ray head with 0 CPUs and two worker
nodes started with `ray start --address`, shards and MLflow's artifact store on a local S3 server
(moto), and the tiny pipeline submitted twice with `ray job submit --working-dir`."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = ["bash", "scripts/local_cluster.sh"]
STAGES = ("teacher", "relevance", "zoomer", "zoomvit", "baseline", "evaluate")
SHORTER = [  # the mechanics, not the models: one epoch each, no baseline family
    *("--set", "baseline.input_sizes=[]", "--set", "teacher.train.epochs=1", "--set", "zoomer.train.epochs=2"),
    *("--set", "zoomvit.train.epochs=1", "--set", "baseline.train.epochs=1"),
]


def _sh(*args: str, state: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(
        [*SCRIPT, *args], cwd=REPO, env={**env, "ZOOMVIT_CLUSTER_DIR": str(state)}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{args}: {proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _ports(state: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split("=") for line in (state / "ports.env").read_text().split())}


PLACEMENT_PROBE = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = {n.node_id: n for n in list_nodes(address=address, detail=True)}
def kind(node_id):
    res = nodes[node_id].resources_total
    return "head" if not res.get("CPU") else "cpu_ingest" if "cpu_ingest" in res else "gpu_h100x8"
actors = list_actors(address=address, detail=True, limit=10000)
print(json.dumps(sorted({(a.class_name, kind(a.node_id), a.required_resources.get("CPU", 0)) for a in actors})))
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_pipeline_runs_on_a_multi_node_cluster_with_shards_and_mlflow_artifacts_on_s3(tmp_path):
    import boto3

    state = tmp_path / "cluster"
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    try:
        _sh("up", state=state, timeout=300)
        ports = _ports(state)
        first = _sh("submit", *SHORTER, state=state, timeout=900)
        dashboard = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"
        auth = {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists() else {}
        probe = subprocess.run(
            ["python3", "-c", PLACEMENT_PROBE, dashboard],
            env={**os.environ, **auth},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        placed = {tuple(p) for p in json.loads(probe.stdout.strip().splitlines()[-1])}
        second = _sh("submit", *SHORTER, state=state, timeout=600)
        copies = list(Path("/tmp/ray/session_latest/runtime_resources/working_dir_files").glob("*"))
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{ports['S3_PORT']}",
            aws_access_key_id="zoomvit-local",
            aws_secret_access_key="zoomvit-local",
            region_name="us-east-1",
        )
        keys = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="zoomvit")
            for o in page["Contents"]
        ]
        written = {p.name for c in copies if c.is_dir() for p in c.iterdir()} & {"runs", "mlflow.db", "demo_data"}
    finally:
        _sh("down", state=state, timeout=120)

    out = first.stdout + first.stderr
    for stage in STAGES:
        assert re.search(rf"\[{stage}\] done in", out), f"{stage} did not run:\n{out[-3000:]}"
    training = {node for cls, node, _ in placed if cls == "RayTrainWorker"}
    relevance = {node for cls, node, _ in placed if "MapBatches" in cls or "MapWorker" in cls}
    assert training == {"gpu_h100x8"}, f"training workers ran where train.resources do not point: {placed}"
    assert relevance == {"cpu_ingest"}, f"relevance actors ran where relevance.resources do not point: {placed}"
    on_head = {cls for cls, node, cpus in placed if node == "head" and cpus > 0}
    assert not on_head, f"work that needs CPUs ran on the head node (0 CPUs): {on_head}"

    again = second.stdout + second.stderr
    for stage in STAGES:
        assert re.search(rf"\[{stage}\] cache hit", again), f"{stage} was not a cache hit:\n{again[-3000:]}"

    shards = [k for k in keys if k.startswith("shards/") and k.endswith(".tar")]
    logged = [k for k in keys if k.startswith("mlflow/")]
    assert shards, keys[:20]
    assert any(k.endswith("/MLmodel") for k in logged), "logged models are in the S3 artifact store"
    assert any(k.endswith("lineage.json") for k in logged)
    assert any(k.endswith("/artifacts/model.safetensors") for k in logged), "weights inside each logged model"

    artifacts = state / "artifacts"
    assert list(artifacts.glob("relevance/*/manifest.json")) and list(artifacts.glob("relevance/*/*.parquet"))
    assert list(artifacts.glob("zoomvit/*/model.safetensors"))
    after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert after == before, "the job wrote into the repository it was submitted from"
    assert copies and not written, f"the job wrote {written} into its working-dir copy"
