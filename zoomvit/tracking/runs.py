"""MLflow records of a pipeline run: a parent run, one nested run per stage, inputs, models, lineage.

Everything goes through explicit run ids (``MlflowClient``) so stages, Ray Train workers and
restarts log into the runs they were given, never into an ambient "active run".
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

import mlflow
from zoomvit.home import default_dir

PARENT_TAG = "mlflow.parentRunId"
# The experiment's kind, which MLflow 3's UI reads to pick its model-training view over the GenAI one when
# its workflow switch is off (3.17's switch decides by itself: see ui_url).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
MAX_PARAM_LEN = 6000
log = logging.getLogger(__name__)


def run_status(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def resolve_tracking_uri(uri: str | None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a sqlite store in :func:`default_dir`. A
    relative sqlite path (``sqlite:///mlflow.db``) is taken relative to :func:`default_dir` too, so
    inside a Ray job's working-dir copy it does not vanish with the copy."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not chosen:
        chosen = "sqlite:///mlflow.db"
    path = chosen.removeprefix("sqlite:///")
    if chosen.startswith("sqlite:///") and not path.startswith("/") and path != ":memory:":
        home = default_dir()
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / path}"
    return chosen


def local_artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store beside its database (``mlartifacts/``), not in MLflow's default
    ``./mlruns`` of whatever the working directory is (a Ray job's copy is deleted after the job)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def ui_url(uri: str, experiment_id: str | None, run_id: str | None = None) -> str | None:
    """A link into the MLflow UI of an http(s) tracking server, in its model-training view. MLflow 3.17's
    UI takes the view from its workflow switch (the ``workflowType`` query, else the browser's last
    choice, else GenAI), not from the experiment's ``mlflow.experimentKind`` tag, so the link says it."""
    from urllib.parse import urlsplit, urlunsplit

    if not uri.startswith(("http://", "https://")) or experiment_id is None:
        return None
    parts = urlsplit(uri)
    base = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path.rstrip("/"), "", ""))
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{path}?workflowType=machine_learning"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class Tracker:
    """MLflow through explicit run ids. ``experiment``: where :meth:`start` creates runs (None for a
    tracker that only logs into runs that exist, as a training worker does)."""

    def __init__(self, uri: str, experiment: str | None = None) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = None
        if experiment is not None:
            found = self.client.get_experiment_by_name(experiment)
            if found:
                self.experiment_id = found.experiment_id
            else:
                self.experiment_id = self._create_experiment(experiment)
            if not found or found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
                try:
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
                except MlflowException:  # a run started at the same moment set it first
                    if self.client.get_experiment(self.experiment_id).tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
                        raise

    def _create_experiment(self, name: str) -> str:
        """Create the experiment; a run started at the same moment may have created it first: take that one."""
        try:
            return self.client.create_experiment(name, artifact_location=local_artifact_location(self.uri))
        except MlflowException as err:
            found = self.client.get_experiment_by_name(name) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
            if found is None:
                raise
            return found.experiment_id

    def start(self, name: str, *, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        assert self.experiment_id is not None, "a tracker without an experiment only logs into existing runs"
        all_tags = dict(tags or {})
        if parent:
            all_tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def end(self, run_id: str, *, error: BaseException | None = None) -> None:
        """FINISHED, or FAILED with an ``error`` tag, or KILLED when the process was stopped."""
        if error is not None:
            self.client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        self.client.set_terminated(run_id, status=run_status(error))

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        batch = metric_batch(metrics, step)
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i : i + 500])

    def backfill_history(self, run_id: str, history: list[dict[str, Any]], *, step_key: str = "epoch") -> int:
        """Log every value of a per-epoch ``history`` that the run does not hold yet (the worker could not
        deliver it); tags the run when it did. Returns how many values were added."""
        missing: list[Metric] = []
        keys = {k for row in history for k, v in row.items() if k != step_key and _is_number(v)}
        have = {k: {m.step for m in self.client.get_metric_history(run_id, k)} for k in sorted(keys)}
        for row in history:
            step = int(row.get(step_key, 0))
            missing += [m for m in metric_batch(row, step) if m.key != step_key and m.step not in have[m.key]]
        for i in range(0, len(missing), 500):
            self.client.log_batch(run_id, metrics=missing[i : i + 500])
        if missing:
            self.tags(run_id, {"metrics_backfilled": f"{len(missing)} values logged after the stage ended"})
        return len(missing)

    def artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def dataset_input(self, run_id: str, *, name: str, source: str, digest: str, context: str) -> None:
        """Record an input by reference (a content digest, nothing loaded)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = MetaDataset(source=resolve_dataset_source(source), name=name, digest=digest[:36])
        context_tag = InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)
        inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[context_tag])]
        for attempt in range(3):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except MlflowException as err:
                # two runs logging one dataset at once: the store looks it up, then both insert it and one
                # insert fails its unique constraint; again, the dataset is there and is linked
                if attempt == 2 or not any(
                    m in str(err) for m in ("UNIQUE constraint", "unique constraint", "Duplicate entry")
                ):
                    raise
                time.sleep(0.2 * (attempt + 1))

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """The run as MLflow's active run, for the fluent APIs that know no other (log_model). Leaving
        ``start_run``'s block ends the run (FINISHED, FAILED): it is set RUNNING again, as it still is
        until :meth:`end`."""
        mlflow.set_tracking_uri(self.uri)
        try:
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                yield
        finally:
            self.client.update_run(run_id, status="RUNNING")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_batch(metrics: dict[str, Any], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]


class MetricBuffer:
    """Per-step metrics delivered by a background thread: the training loop never waits for the
    tracking server and never fails because of it. Undelivered batches are retried every
    ``retry_s``; one warning when a batch has waited ``warn_after_s``; when delivery resumes, the run
    gets a ``metrics_delayed`` tag. :meth:`close` waits at most ``timeout_s`` and returns how many
    batches were left undelivered (the driver backfills those from the checkpointed history)."""

    def __init__(self, tracker: Tracker, run_id: str, *, retry_s: float = 5.0, warn_after_s: float = 30.0) -> None:
        self.tracker, self.run_id = tracker, run_id
        self.retry_s, self.warn_after_s = retry_s, warn_after_s
        self._pending: list[tuple[float, list[Metric]]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._warned = False
        self._max_delay = 0.0
        self._thread = threading.Thread(target=self._deliver, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        batch = metric_batch(metrics, step)
        with self._cond:
            self._pending.append((time.monotonic(), batch))
            oldest = self._pending[0][0]
            self._cond.notify()
        if not self._warned and time.monotonic() - oldest > self.warn_after_s:
            self._warned = True
            log.warning(
                "the tracking server %s has not taken metrics for %.0f s (%d batches waiting): training goes on, "
                "they are retried in the background",
                self.tracker.uri,
                time.monotonic() - oldest,
                len(self._pending),
            )

    def close(self, timeout_s: float = 10.0) -> int:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            return len(self._pending)

    def _deliver(self) -> None:
        failed_since: float | None = None
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                queued, batch = self._pending[0]
            try:
                for i in range(0, len(batch), 500):
                    self.tracker.client.log_batch(self.run_id, metrics=batch[i : i + 500])
            except Exception as exc:  # noqa: BLE001 - any tracking failure is retried, never raised into training
                if failed_since is None:
                    failed_since = time.monotonic()
                    log.warning("could not log metrics to %s (%s); retrying in the background", self.tracker.uri, exc)
                with self._cond:
                    self._cond.wait(self.retry_s)
                continue
            with self._cond:
                self._pending.pop(0)
            delay = time.monotonic() - queued
            self._max_delay = max(self._max_delay, delay)
            if failed_since is not None or delay > self.warn_after_s:
                failed_since = None
                try:
                    self.tracker.tags(self.run_id, {"metrics_delayed": f"up to {self._max_delay:.0f} s (tracking "
                                                                      "server unreachable)"})  # fmt: skip
                except Exception:  # noqa: BLE001
                    pass


class SystemMetrics:
    """MLflow's sampler of CPU, memory, disk, network and (with pynvml) GPU use, logged into the run as
    ``system/*`` metrics every ``interval_s``. It stops by itself when the tracking server goes away;
    :meth:`stop` never waits more than ``timeout_s`` for it (its last flush may retry for minutes)."""

    def __init__(self, tracking: dict[str, str], interval_s: float = 10.0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            tracking["run_id"], sampling_interval=interval_s, tracking_uri=tracking["uri"]
        )
        self.monitor.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """One last sample (a run shorter than ``interval_s`` gets one too), then the sampler ends."""

        def finish_then_last_sample() -> None:
            self.monitor.finish()  # the sampler thread ends first: nothing samples concurrently below
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()

        stopper = threading.Thread(target=finish_then_last_sample, name="mlflow-system-metrics-stop", daemon=True)
        stopper.start()
        stopper.join(timeout_s)


def lineage_picture(lineage: dict[str, Any], path: str | Path) -> None:
    """The stage DAG as a PNG: nodes carry run ids and cache status, edges the artifact passed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = lineage["stages"]
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            ups = [u["stage"] for u in nodes[name]["upstream"]]
            depth[name] = 1 + max((level(u) for u in ups), default=-1)
        return depth[name]

    for name in nodes:
        level(name)
    columns: dict[int, list[str]] = {}
    for name in nodes:
        columns.setdefault(depth[name], []).append(name)
    pos = {n: (d * 3.2, -i * 1.6 + (len(c) - 1) * 0.8) for d, c in columns.items() for i, n in enumerate(c)}
    fig, ax = plt.subplots(figsize=(3.2 * (len(columns) + 0.5), 2.2 + 1.4 * max(len(c) for c in columns.values())))
    colors = {"hit": "#cfe8cf", "miss": "#fde2b8", "failed": "#f4b6b6", "skipped": "#e0e0e0"}
    for name, node in nodes.items():
        x, y = pos[name]
        for up in node["upstream"]:
            ux, uy = pos[up["stage"]]
            ax.annotate("", xy=(x - 1.0, y), xytext=(ux + 1.0, uy), arrowprops={"arrowstyle": "->", "color": "#555"})
            ax.text((x + ux) / 2, (y + uy) / 2 + 0.12, up["artifact"], fontsize=7, ha="center", color="#333")
        ax.add_patch(plt.Rectangle((x - 1.0, y - 0.45), 2.0, 0.9, fc=colors.get(node["cache"], "white"), ec="#333"))
        ax.text(x, y + 0.15, name, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(
            x, y - 0.18, f"{node['cache']} · {str(node.get('run_id') or '-')[:8]}", ha="center", va="center", fontsize=7
        )
    ax.set_xlim(-1.5, 3.2 * len(columns) - 1.5)
    ys = [p[1] for p in pos.values()]
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def shards_digest(infos: Iterable[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for info in infos:
        h.update(f"{info.path}|{info.size}|{info.mtime}\n".encode())
    return h.hexdigest()
