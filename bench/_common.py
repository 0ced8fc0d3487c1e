"""Shared helpers for the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zoomvit.logs import configure as configure_logging

RESULTS = Path(__file__).resolve().parent / "results"
configure_logging()  # the benchmarks are scripts: the pipeline's progress lines on stdout


def machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median_time(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, sync: bool = False) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the demo's server on 127.0.0.1:5000 when it answers, else a sqlite file."""
    import urllib.request

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    try:
        with urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=2):
            return "http://127.0.0.1:5000"
    except OSError:
        return f"sqlite:///{RESULTS.parents[1] / 'mlflow.db'}"


def log_to_mlflow(
    name: str,
    *,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifact: dict[str, Any],
    figure: Path | None = None,
) -> str:
    """One run in the 'zoomvit-bench' experiment with the benchmark's params, metrics, JSON and figure."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri())
    experiment = client.get_experiment_by_name("zoomvit-bench")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("zoomvit-bench")
    run = client.create_run(
        experiment_id, run_name=name, tags={"benchmark": name, **{f"machine.{k}": str(v) for k, v in machine().items()}}
    )
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:500])
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    client.log_dict(run_id, artifact, f"{name}.json")
    if figure is not None:
        client.log_artifact(run_id, str(figure))
    client.set_terminated(run_id)
    print(f"MLflow: run {run_id} in experiment zoomvit-bench at {client.tracking_uri}")
    return run_id


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
