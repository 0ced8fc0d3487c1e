"""SIGKILL of the pipeline's driver in the middle of a stage (nothing gets to clean up): the output is
not committed, and the rerun resumes from what was durably written instead of starting over, ending
where an uninterrupted run ends."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TINY_YAML
from servers import own_local_ray, ray_env, shutdown_ray_local, stop_own_ray

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]
EPOCHS = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Each driver starts a local Ray of its own (``own_local_ray``: in this module's temp dir, never
    joining another Ray on the machine)."""
    shutdown_ray_local()
    root = tmp_path_factory.mktemp("killed")
    sets = ["--set", f"data.root={root / 'data'}", "--set", f"artifact_root={root / 'runs'}"]
    sets += ["--set", f"teacher.train.epochs={EPOCHS}"]
    with own_local_ray(ray_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")) as env:
        yield {"root": root, "env": env, "sets": sets}


def command(workspace, *args: str) -> list[str]:
    return [sys.executable, "pipelines/full.py", "--config", TINY_YAML, *workspace["sets"], *args]


def run(workspace, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(workspace, *args), cwd=REPO, env=workspace["env"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def kill_driver_when(workspace, args: list[str], ready) -> str:
    """Start the pipeline, SIGKILL its whole process group (driver, local Ray, workers) once
    ``ready(lines_so_far)`` holds, and return what it printed."""
    proc = subprocess.Popen(
        command(workspace, *args),
        cwd=REPO,
        env=workspace["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # one line at a time
    reader.start()
    deadline = time.monotonic() + 600
    try:
        while not ready(lines):
            assert proc.poll() is None, "the pipeline ended before the kill:\n" + "".join(lines[-50:])
            assert time.monotonic() < deadline, "never reached the kill point:\n" + "".join(lines[-50:])
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
        stop_own_ray(workspace["env"]["RAY_TMPDIR"], remove=False)  # whatever its Ray left outside the group
    return "".join(lines)


def stage_dir(workspace, stage: str) -> Path:
    (out,) = [p for p in (workspace["root"] / "runs" / stage).iterdir() if p.is_dir()]
    return out


def test_a_driver_killed_mid_training_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_run(workspace):
    def third_epoch_done(lines) -> bool:  # its end-of-epoch line, not a progress line within it
        return any(re.search(r"\[teacher\] epoch 3/\d+ train_loss=", line) for line in lines)

    printed = kill_driver_when(workspace, ["--only", "teacher"], third_epoch_done)
    out = stage_dir(workspace, "teacher")
    assert not (out / "manifest.json").exists(), "a killed stage must not look cached"
    before = {
        int(m.group(1)) - 1: float(m.group(2))
        for m in re.finditer(r"\[teacher\] epoch (\d+)/\d+ train_loss=([0-9.e+-]+)", printed)
    }
    assert len(before) >= 3

    rerun = run(workspace, "--only", "teacher")
    resumed = re.search(r"\[teacher\] resumed from the checkpoint of epoch (\d+)", rerun.stdout + rerun.stderr)
    assert resumed, "the rerun must resume, not start over"
    start = int(resumed.group(1))  # the newest checkpoint Ray Train had registered: epoch 2 or 3 of the 3 printed
    assert start >= 2
    history = json.loads((out / "manifest.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS)), "every epoch once, none repeated or lost"
    for epoch in range(start):  # the epochs before the kill come back from the checkpoint, not recomputed
        assert history[epoch]["train_loss"] == pytest.approx(before[epoch], rel=1e-3)
    assert f"[teacher] epoch 1/{EPOCHS}" not in rerun.stdout + rerun.stderr

    import mlflow

    client = mlflow.MlflowClient(workspace["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("zoomvit").experiment_id], order_by=["start_time ASC"])
    killed = [r for r in runs if r.info.status != "FINISHED"]
    assert {r.data.tags.get("stage", "pipeline") for r in killed} == {"pipeline", "teacher"}, "the killed run's two"
    for r in killed:  # its driver could not end them; the rerun found its lock free and did
        assert r.info.status == "KILLED" and "driver died" in r.data.tags["zoomvit.ended_by"]
    assert "left RUNNING by a driver that died" in rerun.stdout + rerun.stderr

    straight = {
        **workspace,
        "sets": [*workspace["sets"], "--set", f"artifact_root={workspace['root'] / 'uninterrupted'}"],
    }
    run(straight, "--only", "teacher")  # the same stage uninterrupted, in another cache
    (reference,) = (workspace["root"] / "uninterrupted" / "teacher").glob("*/manifest.json")
    uninterrupted = json.loads(reference.read_text())["history"]
    for resumed_epoch, straight_epoch in zip(history, uninterrupted, strict=True):
        for key in ("train_loss", "val_loss", "val_top1"):  # the resumed run draws what the straight one drew
            assert resumed_epoch[key] == pytest.approx(straight_epoch[key], rel=1e-4, abs=1e-6), (key, resumed_epoch)
    from safetensors.torch import load_file

    resumed_weights, straight_weights = (
        load_file(str(out / "model.safetensors")),
        load_file(str(reference.parent / "model.safetensors")),
    )
    for name, tensor in straight_weights.items():
        assert torch.allclose(resumed_weights[name], tensor, rtol=1e-4, atol=1e-5), name


def test_a_driver_killed_mid_relevance_keeps_committed_groups_and_the_rerun_equals_a_straight_run(workspace):
    teacher_dir = workspace["root"] / "runs" / "teacher"
    if not list(teacher_dir.glob("*/manifest.json")):  # the test above leaves it cached
        run(workspace, "--only", "teacher")

    def a_group_is_committed(_lines) -> bool:  # its skip counts are written last, with the Parquet file's hash
        base = workspace["root"] / "runs" / "relevance"
        return base.exists() and any(base.glob("*/*.skips.json"))

    kill_driver_when(workspace, ["--only", "relevance"], a_group_is_committed)
    out = stage_dir(workspace, "relevance")
    assert not (out / "manifest.json").exists()
    committed = sorted(p.name for p in out.glob("*.skips.json"))
    assert committed, "the kill came after a group was committed"

    run(workspace, "--only", "relevance")
    stats = json.loads((out / "manifest.json").read_text())["metrics"]
    assert stats["groups_cached"] == len(committed), stats
    assert stats["groups_computed"] >= 1, f"the kill came after every group was committed: {stats}"
    assert not list(out.glob(".*tmp*")), "no temporary file left behind"

    straight = workspace["root"] / "straight"
    teacher = stage_dir(workspace, "teacher") / "model.safetensors"
    subprocess.run(
        [
            sys.executable,
            "pipelines/relevance.py",
            "--config",
            TINY_YAML,
            *workspace["sets"],
            "--out",
            str(straight),
            "--checkpoint",
            str(teacher),
        ],
        cwd=REPO,
        env=workspace["env"],
        check=True,
        capture_output=True,
        timeout=900,
    )
    names = sorted(p.name for p in straight.glob("*.parquet"))
    assert names == sorted(p.name for p in out.glob("*.parquet"))
    for name in names:
        resumed, reference = pq.read_table(out / name), pq.read_table(straight / name)
        assert resumed.column("key").to_pylist() == reference.column("key").to_pylist(), name
        np.testing.assert_allclose(
            np.stack(resumed.column("relevance").to_numpy(zero_copy_only=False)).astype(np.float32),
            np.stack(reference.column("relevance").to_numpy(zero_copy_only=False)).astype(np.float32),
            rtol=1e-3,
            atol=1e-6,
        )
