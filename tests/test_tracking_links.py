"""Where the pipeline points people and files: MLflow UI links, sqlite artifact locations, quiet workers."""

import json

from zoomvit.pipeline.runtime import QUIET_WORKERS, quiet_workers_env
from zoomvit.tracking.runs import local_artifact_location, ui_url


def test_ui_links_open_the_model_training_view_and_never_carry_credentials():
    url = ui_url("https://alice:s3cret@mlflow.example.com:5000/", "7", "abc")
    assert url == "https://mlflow.example.com:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert ui_url("http://127.0.0.1:5000", "1") == "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
    assert ui_url("sqlite:///mlflow.db", "1") is None, "a file store has no UI to link"


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path):
    location = local_artifact_location(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    assert location == (tmp_path / "db" / "mlartifacts").as_uri()
    assert local_artifact_location("http://127.0.0.1:5000") is None, "a server decides its own"


def test_quiet_worker_env_leaves_the_keys_a_submitted_job_sets_to_the_job(monkeypatch):
    from ray.runtime_env.runtime_env import _merge_runtime_env

    monkeypatch.delenv("ZOOMVIT_VERBOSE", raising=False)
    job_env = {"env_vars": {"RAY_DATA_LOG_LEVEL": "INFO", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    env = quiet_workers_env()
    assert "RAY_DATA_LOG_LEVEL" not in env["env_vars"], "the job's own value wins"
    assert set(env["env_vars"]) == set(QUIET_WORKERS) - {"RAY_DATA_LOG_LEVEL"}
    merged = _merge_runtime_env(job_env, env)  # what ray.init does inside a job; None means a conflict
    assert merged is not None and merged["env_vars"]["RAY_DATA_LOG_LEVEL"] == "INFO"


def test_verbose_runs_keep_every_library_line(monkeypatch):
    monkeypatch.setenv("ZOOMVIT_VERBOSE", "1")
    assert quiet_workers_env() is None


def test_workers_of_a_driver_that_joined_by_address_find_that_cluster_where_another_ray_runs(monkeypatch):
    from zoomvit.pipeline.runtime import with_cluster_address

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = with_cluster_address({"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}}, "10.0.0.5:6379")
    assert env["env_vars"] == {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_ADDRESS": "10.0.0.5:6379"}
    assert with_cluster_address(None, "10.0.0.5:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
    assert with_cluster_address(None, "auto") is None and with_cluster_address(None, "ray://head:10001") is None
    job_env = {"env_vars": {"RAY_ADDRESS": "head:6379"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    assert with_cluster_address(None, "10.0.0.5:6379") is None, "the job's own value wins"
