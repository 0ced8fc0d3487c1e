"""Fault injection on the tracking path, with a real MLflow server and real processes: an outage in the
middle of training, and SIGTERM (what ``ray job stop`` sends) in the middle of a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from servers import REPO, free_port, serve

from zoomvit.tracking.runs import MetricBuffer, Tracker


def test_the_driver_backfills_exactly_the_epochs_the_worker_could_not_log(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "backfill")
    run = tracker.start("teacher")
    history = [{"epoch": e, "train_loss": 2.0 - e / 10, "val_top1": 0.1 * e} for e in range(3)]
    tracker.metrics(run, {"train_loss": 2.0, "val_top1": 0.0}, step=0)
    tracker.metrics(run, {"train_loss": 1.8, "val_top1": 0.2}, step=2)
    assert tracker.backfill_history(run, history) == 2
    steps = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run, "train_loss"))
    assert steps == [(0, 2.0), (1, 1.9), (2, 1.8)]
    assert "metrics_backfilled" in tracker.client.get_run(run).data.tags
    assert tracker.backfill_history(run, history) == 0


@pytest.mark.slow
def test_a_tracking_server_outage_mid_training_delays_metrics_without_stopping_or_losing_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    state, port = tmp_path / "server", free_port()
    serve(state, port)
    try:
        tracker = Tracker(f"http://127.0.0.1:{port}", "outage")
        run = tracker.start("zoomvit")
        buffer = MetricBuffer(tracker, run, retry_s=0.5, warn_after_s=2.0)
        buffer.log({"train_loss": 2.0}, step=0)
        deadline = time.monotonic() + 30
        while not tracker.client.get_metric_history(run, "train_loss") and time.monotonic() < deadline:
            time.sleep(0.2)
        serve(state, port, "--stop")
        stopped = time.monotonic()
        for epoch in range(1, 6):  # the training loop goes on while the server is down
            start = time.perf_counter()
            buffer.log({"train_loss": 2.0 - epoch / 10}, step=epoch)
            assert time.perf_counter() - start < 0.5
            time.sleep(1.0)
        assert time.monotonic() - stopped >= 5
        serve(state, port)
        assert buffer.close(timeout_s=60) == 0
        steps = sorted(m.step for m in tracker.client.get_metric_history(run, "train_loss"))
        assert steps == [0, 1, 2, 3, 4, 5]
        assert "metrics_delayed" in tracker.client.get_run(run).data.tags
    finally:
        serve(state, port, "--stop")


@pytest.mark.slow
def test_sigterm_mid_run_ends_every_open_run_as_killed_and_the_pipeline_exits_143(tmp_path):
    import mlflow

    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "pipelines/full.py",
            "--config",
            "pipelines/configs/tiny.yaml",
            "--set",
            f"data.root={tmp_path / 'data'}",
            "--set",
            f"artifact_root={tmp_path / 'runs'}",
            "--set",
            "teacher.train.epochs=50",
        ],
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if "[teacher] start" in line:
            break
    time.sleep(15)  # inside Ray Train's fit
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(output) + rest
    assert proc.returncode == 143, log[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("zoomvit").experiment_id])
    status = {r.data.tags.get("stage", "pipeline"): r.info.status for r in runs}
    assert status == {"pipeline": "KILLED", "teacher": "KILLED"}, log[-3000:]
