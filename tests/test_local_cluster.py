"""The cluster path on one machine (scripts/local_cluster.sh): a Ray head with 0 CPUs and three worker
nodes started with `ray start --address`, the shards, the stage cache (every output, its training
checkpoints) and MLflow's artifact store on a local S3 server (moto), the tiny pipeline submitted twice
with `ray job submit --working-dir`, and the node running the training workers lost in the middle of
training."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO
from servers import shutdown_ray_local

SCRIPT = ["bash", "scripts/local_cluster.sh"]
STAGES = ("teacher", "relevance", "zoomer", "zoomvit", "baseline", "evaluate")
TEACHER_EPOCHS = 12  # long enough to lose a node between its first registered checkpoint and its end
SHORTER = [  # the mechanics, not the models: few epochs, no baseline family
    *("--set", "baseline.input_sizes=[]", "--set", f"teacher.train.epochs={TEACHER_EPOCHS}"),
    *("--set", "zoomer.train.epochs=2", "--set", "zoomvit.train.epochs=1", "--set", "baseline.train.epochs=1"),
]


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # Ray Train's default controller poll (2 s) paces each epoch: 12 epochs leave time to lose the node
    return {**env, "ZOOMVIT_CLUSTER_DIR": str(state), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}


def _sh(*args: str, state: Path, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SCRIPT, *args], cwd=REPO, env=_env(state), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _probe(script: str, dashboard: str) -> object:
    auth = {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists() else {}
    proc = subprocess.run(
        ["python3", "-c", script, dashboard], env={**os.environ, **auth}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _keys(s3, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="zoomvit", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _ports(state: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split("=") for line in (state / "ports.env").read_text().split())}


PLACEMENT_PROBE = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = {n.node_id: n for n in list_nodes(address=address, detail=True)}
def name(node_id):
    return "head" if nodes[node_id].is_head_node else nodes[node_id].node_name
actors = [a for a in list_actors(address=address, detail=True, limit=10000) if a.node_id]  # placed, ran somewhere
print(json.dumps(sorted({(a.class_name, name(a.node_id), a.required_resources.get("CPU", 0)) for a in actors})))
"""
TRAINING_NODES_PROBE = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
names = {n.node_id: n.node_name for n in list_nodes(address=address, detail=True)}
alive = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
print(json.dumps(sorted({names[a.node_id] for a in alive})))
"""


def _lose_the_training_node(s3, state: Path, dashboard: str, submission: subprocess.Popen) -> str:
    """Once Ray Train has registered a teacher checkpoint in the bucket (its checkpoint manager's
    snapshot names one), SIGKILL a node its workers run on."""
    deadline = time.time() + 600
    while time.time() < deadline and submission.poll() is None:
        snapshots = [k for k in _keys(s3, "artifacts/teacher/") if k.endswith("/checkpoint_manager_snapshot.json")]
        snapshot = s3.get_object(Bucket="zoomvit", Key=snapshots[0])["Body"].read().decode() if snapshots else ""
        if re.search(r'"checkpoint_dir_name":\s*"checkpoint_', snapshot):
            nodes = _probe(TRAINING_NODES_PROBE, dashboard)  # one: Ray Train packs its workers by default
            assert nodes, "the teacher checkpoints, but no training worker is alive"
            _sh("lose-node", nodes[0], state=state, timeout=60)
            return nodes[0]
        time.sleep(0.2)
    raise AssertionError(f"no teacher checkpoint was registered in the bucket (submission exit {submission.poll()})")


@pytest.mark.slow
@pytest.mark.own_ray
@pytest.mark.timeout(1500)
def test_the_pipeline_runs_on_a_multi_node_cluster_with_its_shards_stage_cache_and_mlflow_artifacts_on_s3(tmp_path):
    import boto3

    shutdown_ray_local()  # the cores to the cluster; `local_cluster.sh down` stops the cluster's own nodes only
    state = tmp_path / "cluster"
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    try:
        _sh("up", state=state, timeout=300)
        ports = _ports(state)
        dashboard = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{ports['S3_PORT']}",
            aws_access_key_id="zoomvit-local",
            aws_secret_access_key="zoomvit-local",
            region_name="us-east-1",
        )
        submission = subprocess.Popen(
            [*SCRIPT, "submit", *SHORTER], cwd=REPO, env=_env(state), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            lost = _lose_the_training_node(s3, state, dashboard, submission)
            out, _ = submission.communicate(timeout=900)
        finally:
            submission.kill()
        assert submission.returncode == 0, out[-6000:]
        placed = {tuple(p) for p in _probe(PLACEMENT_PROBE, dashboard)}
        second = _sh("submit", *SHORTER, state=state, timeout=600)
        head_session = Path(f"/tmp/ray-{ports['RAY_PORT']}-head/session_latest")  # the head's own temp dir
        copies = list((head_session / "runtime_resources/working_dir_files").glob("*"))
        keys = _keys(s3)
        manifests = {k.split("/")[1]: json.loads(s3.get_object(Bucket="zoomvit", Key=k)["Body"].read())
                     for k in keys if re.fullmatch(r"artifacts/\w+/[0-9a-f]{16}/manifest\.json", k)}  # fmt: skip
        written = {p.name for c in copies if c.is_dir() for p in c.iterdir()} & {"runs", "mlflow.db", "demo_data"}
    finally:
        _sh("down", state=state, timeout=120)

    for stage in STAGES:
        assert re.search(rf"\[{stage}\] done in", out), f"{stage} did not run:\n{out[-3000:]}"
    training = {node for cls, node, _ in placed if cls == "RayTrainWorker"}
    relevance = {node for cls, node, _ in placed if "MapBatches" in cls or "MapWorker" in cls}
    assert training == {"gpu_h100x8-0", "gpu_h100x8-1"}, f"training ran on the lost node, then on the other: {placed}"
    assert relevance == {"cpu_ingest"}, f"relevance actors ran where relevance.resources do not point: {placed}"
    on_head = {cls for cls, node, cpus in placed if node == "head" and cpus > 0}
    assert not on_head, f"work that needs CPUs ran on the head node (0 CPUs): {on_head}"

    assert sorted(manifests) == sorted(STAGES), f"one committed entry per stage in the bucket: {sorted(manifests)}"
    history = manifests["teacher"]["history"]
    starts = [h["start_epoch"] for h in history if "start_epoch" in h]
    assert [h["epoch"] for h in history] == list(range(TEACHER_EPOCHS)), history
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 1, (
        f"after losing {lost} the teacher resumes from a checkpoint in the bucket, not from scratch: {starts}"
    )

    again = second.stdout + second.stderr
    for stage in STAGES:
        assert re.search(rf"\[{stage}\] cache hit", again), f"{stage} was not a cache hit:\n{again[-3000:]}"

    shards = [k for k in keys if k.startswith("shards/") and k.endswith(".tar")]
    logged = [k for k in keys if k.startswith("mlflow/")]
    assert shards, keys[:20]
    for stage in ("teacher", "zoomer", "zoomvit", "baseline"):
        assert any(re.match(rf"artifacts/{stage}/\w+/ray/.*/checkpoint_", k) for k in keys), f"{stage} checkpoints"
    for stage, manifest in manifests.items():
        where = manifest["out_dir"]
        files = [k for k in keys if k.startswith(where.removeprefix("s3://zoomvit/") + "/")]
        assert where.startswith(f"s3://zoomvit/artifacts/{stage}/") and files, f"{stage}: nothing under {where}"
    relevance = manifests["relevance"]["out_dir"].removeprefix("s3://zoomvit/")
    assert any(k.startswith(relevance) and k.endswith(".parquet") for k in keys), "the relevance groups"
    staged = [p for p in (state / "home" / "staging").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert not [p for p in staged if set(p.relative_to(state / "home" / "staging").parts[3:4]) & set(STAGES)], (
        f"an output (or a checkpoint) stayed on the driver's disk after its upload: {staged}"
    )
    assert any(k.endswith("/MLmodel") for k in logged), "logged models are in the S3 artifact store"
    assert any(k.endswith("lineage.json") for k in logged)
    assert any(k.endswith("/artifacts/model.safetensors") for k in logged), "weights inside each logged model"

    after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert after == before, "the job wrote into the repository it was submitted from"
    assert copies and not written, f"the job wrote {written} into its working-dir copy"
