"""Fault injection on the tracking path, with a real MLflow server and real processes: an outage in the
middle of training, SIGTERM (what ``ray job stop`` sends) unwinding a run, runs a dead driver left open."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, TINY, TINY_YAML
from servers import free_port, own_local_ray, ray_env, serve, shutdown_ray_local

from zoomvit.tracking.runs import Tracker


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


OUTAGE_S = 30
OUTAGE_EPOCHS = 50
POLL = "1"  # s, Ray Train's controller poll: an epoch lasts at least one, so 49 epochs outlast the outage


@pytest.fixture
def driver_env():
    """The driver starts a local Ray of its own (never joining another on the machine), stopped afterwards."""
    with own_local_ray(ray_env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=POLL)) as env:
        yield env


@pytest.mark.slow
@pytest.mark.own_ray
def test_a_30_s_tracking_server_outage_mid_training_neither_stops_the_stage_nor_loses_an_epoch(tmp_path, driver_env):
    import mlflow

    shutdown_ray_local()
    state, port = tmp_path / "server", free_port()
    serve(state, port)
    uri = f"http://127.0.0.1:{port}"
    sets = [f"data.root={tmp_path / 'data'}", f"artifact_root={tmp_path / 'runs'}", f"tracking.uri={uri}",
            f"teacher.train.epochs={OUTAGE_EPOCHS}"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "pipelines/full.py", "--config", TINY_YAML, "--only", "teacher"]
        + [arg for s in sets for arg in ("--set", s)],
        cwd=REPO,
        env=driver_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout))
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any(f"[teacher] epoch 1/{OUTAGE_EPOCHS} train_loss=" in line for _, line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(line for _, line in lines[-40:])
            time.sleep(0.1)
        serve(state, port, "--stop")
        down = time.monotonic()
        time.sleep(OUTAGE_S)
        serve(state, port)
        up = time.monotonic()
        assert proc.wait(timeout=600) == 0
        reader.join()
        printed = "".join(line for _, line in lines)
        epoch_ends = [t for t, line in lines if re.search(r"\[teacher\] epoch \d+/\d+ train_loss=", line)]
        assert sum(down < t < up for t in epoch_ends) >= 2, "training went on during the outage:\n" + printed[-3000:]
        assert any(t > up for t in epoch_ends), "the outage ended before training did:\n" + printed[-3000:]
        client = mlflow.MlflowClient(uri)
        (teacher,) = client.search_runs(
            [client.get_experiment_by_name("zoomvit").experiment_id], filter_string="tags.stage = 'teacher'"
        )
        assert teacher.info.status == "FINISHED", printed[-3000:]
        epochs = sorted(m.step for m in client.get_metric_history(teacher.info.run_id, "val_top1"))
        assert epochs == list(range(OUTAGE_EPOCHS)), "every epoch's metrics are in MLflow afterwards"
        assert {"metrics_delayed", "metrics_backfilled"} & set(teacher.data.tags), "the run says what was delayed"
    finally:
        if proc.poll() is None:
            proc.kill()
        serve(state, port, "--stop")


def test_runs_started_at_the_same_moment_all_open_the_experiment_that_one_of_them_creates(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "warm")  # the database exists; the race is the experiment's creation and its kind tag
    opened, failed = [], []

    def open_it():
        try:
            opened.append(Tracker(uri, "together").experiment_id)
        except Exception as err:  # noqa: BLE001 - the assertion reports it
            failed.append(repr(err))

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == [] and len(set(opened)) == 1 and len(opened) == 6


def test_recording_an_input_or_a_model_leaves_the_run_running_until_it_is_ended(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "running")
    run = tracker.start("tiny")
    tracker.dataset_input(run, name="shards", source=str(tmp_path), digest="0" * 64, context="train+val shards")
    assert tracker.client.get_run(run).info.status == "RUNNING"
    with tracker.active(run):  # MLflow's fluent block ends the run when it is left
        pass
    assert tracker.client.get_run(run).info.status == "RUNNING"
    (dataset,) = tracker.client.get_run(run).inputs.dataset_inputs
    assert dataset.dataset.name == "shards" and [(t.key, t.value) for t in dataset.tags] == [
        ("mlflow.data.context", "train+val shards")
    ]
    tracker.end(run)
    assert tracker.client.get_run(run).info.status == "FINISHED"


def test_sigterm_unwinds_the_run_and_the_pipeline_exits_143_saying_what_it_marked(monkeypatch, capsys):
    """The signal, the unwinding and the exit status; that the open MLflow runs end KILLED when a real
    pipeline is stopped mid-training is test_pipeline_e2e.py's ``ray job stop`` test (SIGTERM too)."""
    from zoomvit.pipeline import commands, runner, runtime

    def stopped_mid_run(config, **_):
        with runtime.sigterm_unwinds():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises into this sleep
        raise AssertionError("SIGTERM did not unwind the run")

    monkeypatch.setattr(runtime, "_terminated", threading.Event())
    monkeypatch.setattr(runtime, "init_ray", lambda **_: None)
    monkeypatch.setattr(runner, "run_pipeline", stopped_mid_run)
    assert commands.full_main(["--config", TINY]) == 143
    assert "stopped by SIGTERM; the runs that were open are marked KILLED" in capsys.readouterr().err


def test_runs_left_running_by_a_dead_driver_end_killed_and_live_or_foreign_ones_are_left(tmp_path):
    from zoomvit.locks import exclusive
    from zoomvit.pipeline.records import DRIVER_LOCK_TAG, end_orphaned_runs

    tracker, root = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "orphans"), tmp_path / "runs"
    drivers = root / ".drivers"

    def pipeline(lock: str) -> tuple[str, str]:
        parent = tracker.start("tiny", tags={"zoomvit.run_type": "pipeline", DRIVER_LOCK_TAG: f"{lock}.lock"})
        return parent, tracker.start("teacher", parent=parent, tags={"zoomvit.run_type": "stage"})

    drivers.mkdir(parents=True)
    (drivers / "dead.lock").write_text("pid 1 on gone\n")  # its holder died: the kernel dropped the flock
    dead = pipeline(str(drivers / "dead"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.lock").touch()
    foreign = pipeline(str(tmp_path / "other" / "x"))  # another artifact root's run
    script = f"from zoomvit.locks import exclusive\nimport time\nwith exclusive({str(drivers / 'alive')!r}, 'x'):\n"
    holder = subprocess.Popen([sys.executable, "-c", script + "    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        alive = pipeline(str(drivers / "alive"))
        with exclusive(drivers / "mine", "x"):
            mine = pipeline(str(drivers / "mine"))
            assert sorted(end_orphaned_runs(tracker, root)) == sorted(dead)
    finally:
        holder.kill()
        holder.wait()
    status = {run: tracker.client.get_run(run).info.status for run in (*dead, *foreign, *alive, *mine)}
    assert [status[r] for r in dead] == ["KILLED", "KILLED"]
    assert all(status[r] == "RUNNING" for r in (*foreign, *alive, *mine))
    assert "driver died" in tracker.client.get_run(dead[1]).data.tags["zoomvit.ended_by"]
    assert not (drivers / "dead.lock").exists()
    assert sorted(end_orphaned_runs(tracker, root)) == sorted([*alive, *mine]), "their drivers are gone now"
