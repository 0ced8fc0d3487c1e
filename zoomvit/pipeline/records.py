"""What a pipeline run records in MLflow beyond run bookkeeping: each computed stage's inputs, model
(logged, registered) and files; the lineage DAG on the parent run; the near-chance warnings."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zoomvit.config import PipelineConfig
from zoomvit.data.shards import ShardInfo
from zoomvit.locks import OutputLock
from zoomvit.pipeline.plan import config_hash
from zoomvit.pipeline.stage_table import STAGES
from zoomvit.tracking.registry import log_code_model, registered_name
from zoomvit.tracking.runs import Tracker, lineage_picture, shards_digest

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from zoomvit.train.task_specs import TaskSpec

LINEAGE = "lineage.json"


def shards_source(config: PipelineConfig) -> str:
    """Where the shards live: their directory, or the URL prefix of remote ones (``s3://bucket/imagenet``)."""
    return config.data.shard_paths("train")[0].rsplit("/", 1)[0]


def lineage_from_run(tracker: Tracker, run_id: str) -> dict[str, Any]:
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=LINEAGE)
    return json.loads(Path(path).read_text())


def near_chance(config: PipelineConfig, manifests: dict[str, dict[str, Any]]) -> list[str]:
    """Models whose val top-1 is not clearly above chance: below chance + 3 binomial standard errors
    (the val size from the evaluate stage; without it, 1.5x chance)."""
    chance = 1.0 / config.data.num_classes
    scores: dict[str, tuple[float, int | None]] = {}
    for name in (n for n, s in STAGES.items() if s.classifier):
        top1 = manifests.get(name, {}).get("metrics", {}).get("val_top1")
        if top1 is not None:
            scores[name] = (top1, None)
    for row in manifests.get("evaluate", {}).get("rows", []):
        if row["model"].startswith(("zoomvit_control", "zoomvit_oracle")):
            continue
        if row["model"] != "zoomvit" or row.get("headline"):
            scores[row["model"]] = (row["top1"], row["n"])
    n_val = next((n for _, n in scores.values() if n), None)
    lines = []
    for name, (top1, n) in scores.items():
        n = n or n_val
        bar = chance + 3 * (chance * (1 - chance) / n) ** 0.5 if n else 1.5 * chance
        if top1 < bar:
            lines.append(
                f"{name} is at chance: val top-1 {100 * top1:.1f}% "
                f"against chance {100 * chance:.1f}% (bar {100 * bar:.1f}%)"
            )
    return lines


def headline_metrics(manifests: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What the pipeline's parent run shows in MLflow's runs table and compare view: the teacher's val
    top-1, the reported ZoomViT's and each baseline family member's top-1 and GFLOPs as executed, and
    ZoomViT minus the family at equal GFLOPs with its 95% interval (overall and per stratum)."""
    out: dict[str, float] = {}
    teacher = manifests.get("teacher", {}).get("metrics", {}).get("val_top1")
    if teacher is not None:
        out["teacher_top1"] = teacher
    evaluate = manifests.get("evaluate", {})
    for row in evaluate.get("rows", []):
        if row["model"] == "zoomvit" and row.get("headline"):
            name = "zoomvit"
        elif row.get("family"):
            name = row["model"]
        else:
            continue
        gflops = row.get("gflops_executed_per_img", row["gflops_per_img"])
        out |= {f"{name}_top1": row["top1"], f"{name}_gflops": gflops}
        out |= {f"{name}_tokens": row["tokens_per_img"]} if name == "zoomvit" else {}
    for part, paired in evaluate.get("equal_gflops", {}).items():
        if isinstance(paired, dict) and (part == "all" or part.startswith("stratum_")):
            key = "zoomvit_minus_family" + ("" if part == "all" else f"_{part.removeprefix('stratum_')}")
            low, high = paired["delta_top1_ci95"]
            out |= {key: paired["delta_top1"], f"{key}_ci95_low": low, f"{key}_ci95_high": high}
    return out


def log_stage_model(
    tracker: Tracker,
    run_id: str,
    *,
    name: str,
    spec: TaskSpec,
    weights: Path,
    image_size: int,
    register_as: str | None,
) -> ModelVersion | None:
    """Log ``weights`` (a trained ``spec``) as the run's model ``name``: MLflow "models from code"
    (:mod:`zoomvit.train.pyfunc_model`) carrying the weights and the spec as JSON, nothing pickled;
    register it as a new version of ``register_as`` when given. Returns that version."""
    from zoomvit.train import pyfunc_model

    side = 2 * image_size if getattr(spec, "zoom_source", None) == "highres" else image_size
    example_BHWC = np.random.default_rng(0).integers(0, 256, size=(1, side, side, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        return log_code_model(
            tracker,
            run_id,
            name=name,
            code=Path(pyfunc_model.__file__),
            model=pyfunc_model.StageModel(),
            artifacts={"weights": str(weights), "spec": str(spec_path)},
            example=example_BHWC,
            metadata={"task": spec.task, "input": "uint8 images (B, H, W, 3)", "mean": spec.mean, "std": spec.std},
            register_as=register_as,
            tags={"stage": name},
        )


def log_stage(
    tracker: Tracker,
    run_id: str,
    config: PipelineConfig,
    manifest: dict[str, Any],
    upstream: dict[str, dict[str, Any]],
    shards: Sequence[ShardInfo],
    *,
    staged: Path,
) -> None:
    """A computed stage's record in its run; its files are read from ``staged`` (its output on this
    machine), whatever the manifest's ``out_dir`` says (an attempt in a bucket, not yet uploaded)."""
    name = manifest["stage"]
    stage = STAGES[name]
    if "history" not in manifest:  # training stages: rank 0 already logged every epoch into this run
        tracker.metrics(run_id, manifest["metrics"])
    tracker.params(run_id, {"out_dir": manifest["out_dir"], "fingerprint": manifest["fingerprint"]})
    if stage.reads_shards:
        tracker.dataset_input(
            run_id,
            name="shards",
            source=shards_source(config),
            digest=shards_digest(shards),
            context=stage.reads_shards,
        )
    if stage.reads_maps:
        rel = upstream["relevance"]
        tracker.dataset_input(
            run_id, name="relevance_maps", source=rel["out_dir"], digest=rel["fingerprint"], context=stage.reads_maps
        )
    if name == "relevance":
        from zoomvit.relevance.job import MANIFEST as RELEVANCE_MANIFEST

        tracker.artifact(run_id, staged / RELEVANCE_MANIFEST)
    if stage.model_spec:
        weights = staged / manifest["files"]["weights"]
        register_as = registered_name(config.tracking.experiment, name) if config.tracking.register_models else None
        version = log_stage_model(
            tracker,
            run_id,
            name=name,
            spec=stage.model_spec(config, manifest),
            weights=weights,
            image_size=config.data.image_size,
            register_as=register_as,
        )
        if version is not None:
            manifest["registered_model"] = {"name": version.name, "version": version.version}
    if "evaluation" in manifest["files"]:  # its figures the stage logged itself (log_figure)
        tracker.artifact(run_id, staged / manifest["files"]["evaluation"])


def write_lineage(
    tracker: Tracker, parent: str, config: PipelineConfig, stages: dict[str, dict[str, Any]], root: Path
) -> list[Path]:
    """The run's stage DAG (``lineage.json`` and ``lineage.png``) under ``root`` and on the parent run;
    the files written."""
    lineage = {"pipeline_run": parent, "config_hash": config_hash(config), "stages": stages}
    out = root / "lineage" / parent
    out.mkdir(parents=True, exist_ok=True)
    (out / LINEAGE).write_text(json.dumps(lineage, indent=2))
    written = [out / LINEAGE]
    if stages:
        lineage_picture(lineage, out / "lineage.png")
        tracker.artifact(parent, out / "lineage.png")
        written.append(out / "lineage.png")
    tracker.artifact(parent, out / LINEAGE)
    return written


DRIVER_LOCK_TAG = "zoomvit.driver_lock"  # held by the driver while its pipeline run is open


def end_orphaned_runs(tracker: Tracker, root: Path) -> list[str]:
    """End as KILLED the pipeline runs still RUNNING whose driver died (SIGKILL, a lost node): their
    driver lock under ``root`` is free. Their open stage runs end with them, each tagged why. Runs
    whose lock lives elsewhere (another artifact root or machine) are left alone."""
    running = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string="attributes.status = 'RUNNING' and tags.`zoomvit.run_type` = 'pipeline'",
    )
    ended = []
    for run in running:
        lock_path = Path(run.data.tags.get(DRIVER_LOCK_TAG, ""))
        if lock_path.parent != root / ".drivers" or not lock_path.exists():
            continue
        with OutputLock(lock_path.with_suffix(""), "[pipeline] driver") as lock:
            if not lock.try_exclusive():
                continue  # its driver is alive
            lock_path.unlink(missing_ok=True)
            if tracker.client.get_run(run.info.run_id).info.status != "RUNNING":
                continue  # it ended between the search and the lock (a driver ends its run, then unlocks)
            children = tracker.client.search_runs(
                [tracker.experiment_id],
                filter_string=f"attributes.status = 'RUNNING' and tags.mlflow.parentRunId = '{run.info.run_id}'",
            )
            why = "its driver died without ending it (found by a later run: the driver's lock was free)"
            for orphan in [*children, run]:
                tracker.tags(orphan.info.run_id, {"zoomvit.ended_by": why})
                tracker.client.set_terminated(orphan.info.run_id, status="KILLED")
                ended.append(orphan.info.run_id)
    return ended
