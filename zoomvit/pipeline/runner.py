"""Running the stage graph with a fingerprint cache and MLflow lineage.

A stage's fingerprint hashes its name, the config sections it reads, its upstream fingerprints,
the input shards' identity (paths, sizes, mtimes/etags) and the package version. Its outputs live in
``<artifact_root>/<stage>/<fingerprint>/`` with a ``manifest.json`` written last: a manifest means
a cache hit. Every stage gets a nested MLflow run under the pipeline's parent run, hit or miss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import zoomvit
from zoomvit.config import PipelineConfig
from zoomvit.data.shards import ShardInfo, shard_infos
from zoomvit.durable import exclusive, write_json_durably
from zoomvit.errors import UserError
from zoomvit.pipeline.graph import STAGES, QualityGateFailed, StageContext
from zoomvit.pipeline.runtime import sigterm_unwinds
from zoomvit.tracking.runs import (
    Tracker,
    default_dir,
    flatten,
    git_commit,
    in_job_working_dir,
    lineage_picture,
    resolve_tracking_uri,
    shards_digest,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LINEAGE = "lineage.json"


class MissingUpstream(UserError):
    """``--only`` named a stage whose upstream output is not in the cache."""


@dataclass
class PipelineResult:
    run_id: str
    tracking_uri: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> lineage node
    warnings: list[str] = field(default_factory=list)  # said plainly at the end of the run

    @property
    def computed(self) -> list[str]:
        return [n for n, s in self.stages.items() if s["cache"] == "miss"]


def artifact_root(config: PipelineConfig) -> Path:
    """The config's artifact root, else $ZOOMVIT_ARTIFACT_ROOT, else ``runs`` under :func:`default_dir`
    (the working directory; ``~/.zoomvit`` inside a ``ray job submit`` working-dir copy)."""
    chosen = config.artifact_root or os.environ.get("ZOOMVIT_ARTIFACT_ROOT")
    return Path(chosen).resolve() if chosen else default_dir() / "runs"


def section(config: PipelineConfig, dotted: str) -> Any:
    value: Any = config.model_dump(mode="json")
    for part in dotted.split("."):
        value = value[part]
    if dotted == "data":  # where the shards live is covered by their identity, not by the path
        value = {k: v for k, v in value.items() if k not in ("root", "demo", "decoded")}
    return value


# Settings that decide how fast or where a stage runs, not what it computes: scaling relevance from 8
# to 16 GPUs, or raising max_failures, must not recompute anything.
RESOURCE_ONLY: dict[str, frozenset[str]] = {
    "relevance": frozenset(
        {
            "batch_size",
            "concurrency",
            "num_cpus_per_actor",
            "actor_threads",
            "decode_num_cpus",
            "decode_in_actor",
            "decode_batch_size",
        }
    ),  # fmt: skip
    "train": frozenset({"cpus_per_worker", "max_failures"}),
}


CHECKPOINT_KEYS = frozenset({"checkpoint", "init_checkpoint"})


def _result_settings(dotted: str, value: Any) -> Any:
    """A config section without its resource-only settings (also inside its ``train`` recipe), with
    checkpoint paths replaced by their content digest."""
    if not isinstance(value, dict):
        return value
    drop = RESOURCE_ONLY.get(dotted.rsplit(".", 1)[-1], frozenset())
    return {
        k: file_digest(v) if k in CHECKPOINT_KEYS and isinstance(v, str) else _result_settings(k, v)
        for k, v in value.items()
        if k not in drop
    }


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str) -> str:
    """A local file's content digest (once per path, size and mtime); a remote file's metadata
    (ETag, size, mtime as its store reports them); the path itself when it cannot be read."""
    if "://" not in path or path.startswith("file://"):
        local = path.split("://", 1)[-1]
        try:
            st = os.stat(local)
        except OSError:
            return path
        return "sha256:" + _digest_of(local, st.st_size, st.st_mtime_ns)
    import fsspec

    try:
        fs, resolved = fsspec.core.url_to_fs(path)
        info = fs.info(resolved)
    except (OSError, ValueError, ImportError):
        return path
    keys = ("ETag", "etag", "size", "LastModified", "mtime", "md5Hash", "crc32c")
    return path + "|" + json.dumps({k: str(info[k]) for k in keys if k in info}, sort_keys=True)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The package's identity: a digest of every source file under ``zoomvit/`` (path and content), so
    a code change recomputes what the old code computed."""
    root = Path(zoomvit.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(name: str, config: PipelineConfig, upstream: dict[str, str], shards: Sequence[ShardInfo]) -> str:
    payload = {
        "stage": name,
        "config": {s: _result_settings(s, section(config, s)) for s in STAGES[name].sections},
        "upstream": dict(sorted(upstream.items())),
        "shards": shards_digest(shards),
        "version": zoomvit.__version__,
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def config_hash(config: PipelineConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def ensure_demo_data(config: PipelineConfig) -> None:
    """Generate the demo dataset into ``data.root`` when the config asks for it and it is missing,
    or when the one there was generated with other settings (its ``_info.json`` says so). Runs
    started together wait for each other: one generates, the others find it done."""
    demo, root = config.data.demo, config.data.root
    if demo is None or root is None:
        return
    with exclusive(Path(root).resolve(), f"[data] {root}"):
        _ensure_demo_data(config, demo, root)


def _ensure_demo_data(config: PipelineConfig, demo, root: str) -> None:
    wanted = {
        "train": demo.train,
        "val": demo.val,
        "image_size": demo.image_size,
        "seed": demo.seed,
        "samples_per_shard": demo.samples_per_shard,
        "photo_clutter": demo.photo_clutter,
        "difficulty": demo.effective_difficulty,
    }
    try:
        config.data.shard_paths("train")
        config.data.shard_paths("val")
    except ValueError:
        pass  # no shards yet: generate them
    else:
        from zoomvit.data.demo import is_demo_dataset

        if not is_demo_dataset(root):
            raise UserError(
                f"data.root {root!r} holds shards that the demo generator did not write, and data.demo asks for "
                "demo data there: refusing to overwrite them. Remove data.demo to train on these shards, or point "
                "data.root at another directory for the demo data."
            )
        generator = json.loads((Path(root) / "_info.json").read_text()).get("generator", {})
        if all(generator.get(k) == v for k, v in wanted.items()):
            return
        log.info(f"[data] the demo dataset in {root} was generated with other settings; regenerating it")
    from zoomvit.data.demo import generate_demo_dataset

    log.info(
        f"[data] generating the demo dataset in {root} ({demo.train} train / {demo.val} val, "
        f"{demo.image_size}px, difficulty {demo.effective_difficulty})",
    )
    generate_demo_dataset(root, **wanted)


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def damage(out_dir: Path) -> str | None:
    """Why a committed output cannot be trusted (an unreadable manifest, a listed file missing or of
    another size than when it was committed), or None when it is intact or absent."""
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    sizes = manifest.get("file_sizes", {})
    for key, rel in manifest.get("files", {}).items():
        file = Path(manifest.get("out_dir", out_dir)) / rel
        if not file.exists():
            return f"its {key} file {file} is missing"
        if key in sizes and file.is_file() and file.stat().st_size != sizes[key]:
            return f"its {key} file {file} has {file.stat().st_size} bytes, {sizes[key]} when committed"
    return None


def lineage_from_run(tracker: Tracker, run_id: str) -> dict[str, Any]:
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=LINEAGE)
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class PlannedStage:
    """What a run will do with one stage: ``run`` it, use its ``cached`` output, or stop because a
    stage that ``--only`` needs is ``missing`` from the cache."""

    name: str
    fingerprint: str
    out_dir: Path
    action: Literal["run", "cached", "missing"]
    why: str
    manifest: dict[str, Any] | None  # the cached output's manifest

    def line(self) -> str:
        return f"{self.name:<10} {self.action:<7} {self.fingerprint[:16]}  {self.why}"


def plan_run(
    config: PipelineConfig,
    shards: Sequence[ShardInfo],
    root: Path,
    *,
    only: Sequence[str] = (),
    force: Sequence[str] = (),
    reused: dict[str, dict[str, Any]] | None = None,
) -> list[PlannedStage]:
    """The stages a run needs, in order, each with its fingerprint and what will happen to it. Reads
    only the config, the shards' identities and the cache's manifests (no Ray, no MLflow).
    ``reused``: lineage nodes of an earlier run (``--from-run``) whose outputs may stand in."""
    for name in [*only, *force]:
        if name not in STAGES:
            raise UserError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    reused = reused or {}
    order = list(STAGES)  # the table's order is the run order: every stage after its upstream
    selected = [n for n in order if not only or n in only]
    needed = set(selected)
    for name in reversed(order):
        if name in needed:
            needed.update(u for u, _ in STAGES[name].upstream_for(config))
    plan: list[PlannedStage] = []
    fingerprints: dict[str, str] = {}
    for name in (n for n in order if n in needed):
        upstream = STAGES[name].upstream_for(config)
        fp = fingerprints[name] = fingerprint(name, config, {u: fingerprints[u] for u, _ in upstream}, shards)
        out_dir = root / name / fp[:16]
        damaged = damage(out_dir)
        manifest = None if damaged else _read_manifest(out_dir)
        if manifest is None and name in reused and reused[name]["fingerprint"] == fp:
            reused_dir = Path(reused[name]["out_dir"])
            manifest = None if damage(reused_dir) else _read_manifest(reused_dir)
        if name in selected and (manifest is None or name in force or only):
            why = "forced" if name in force else "--only" if only else "not in the cache"
            if damaged and manifest is None:
                why = f"the cached output is damaged ({damaged}): recomputing"
            plan.append(PlannedStage(name, fp, out_dir, "run", why, None))
        elif manifest is not None:
            plan.append(PlannedStage(name, fp, out_dir, "cached", f"from run {manifest['run_id']}", manifest))
        else:
            why = f"--only {','.join(only)} needs it: run the pipeline without --only first"
            if damaged:
                why = f"its cached output is damaged ({damaged}); {why}"
            plan.append(PlannedStage(name, fp, out_dir, "missing", why, None))
    return plan


def shards_of(config: PipelineConfig) -> list[ShardInfo]:
    data = config.data
    return shard_infos(data.shard_paths("train") + data.shard_paths("val"))


def run_pipeline(
    config: PipelineConfig,
    *,
    only: Sequence[str] = (),
    force: Sequence[str] = (),
    from_run: str | None = None,
) -> PipelineResult:
    """Plan, then run each stage (or take it from the cache); SIGTERM unwinds, ending open runs as KILLED."""
    with sigterm_unwinds():
        return _run_pipeline(config, only=only, force=force, from_run=from_run)


def lasting_paths(config: PipelineConfig) -> PipelineConfig:
    """Inside a ``ray job submit`` working-dir copy (deleted after the job), generated demo data with a
    relative ``data.root`` goes under :func:`default_dir` instead, so a second submission finds it."""
    data = config.data
    if data.demo is None or data.root is None or not in_job_working_dir():
        return config
    if "://" in data.root or Path(data.root).is_absolute():
        return config
    moved = default_dir() / data.root
    log.info(f"[pipeline] inside a Ray job's working-dir copy: demo data under {moved}")
    return config.model_copy(update={"data": data.model_copy(update={"root": str(moved)})})


def _run_pipeline(
    config: PipelineConfig, *, only: Sequence[str], force: Sequence[str], from_run: str | None
) -> PipelineResult:
    config = lasting_paths(config)
    ensure_demo_data(config)
    train_paths = config.data.shard_paths("train")
    shards = shards_of(config)
    root = artifact_root(config)
    from zoomvit.train.data import DecodedSplits

    tracker = Tracker(resolve_tracking_uri(config.tracking.uri), config.tracking.experiment)
    splits = DecodedSplits()  # the stages of one run share each split's decoded images
    reused = lineage_from_run(tracker, from_run)["stages"] if from_run else {}
    plan = plan_run(config, shards, root, only=only, force=force, reused=reused)
    for step in plan:
        if step.action == "missing":
            raise MissingUpstream(
                f"stage {step.name!r} has no cached output for this configuration (fingerprint "
                f"{step.fingerprint[:16]}), and {step.why}"
            )

    parent = tracker.start(
        config.name, tags={"zoomvit.run_type": "pipeline", "git_commit": git_commit(), "config_hash": config_hash(config)}
    )
    tracker.params(parent, flatten(config.model_dump(mode="json")))
    tracker.client.log_text(parent, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")
    tracker.tags(
        parent,
        {"cluster_resources": json.dumps(_cluster_resources()), "only": ",".join(only), "from_run": from_run or ""},
    )
    tracker.dataset_input(
        parent,
        name="shards",
        source=str(Path(train_paths[0]).parent),
        digest=shards_digest(shards),
        context="train+val shards",
    )
    result = PipelineResult(run_id=parent, tracking_uri=tracker.uri)
    manifests: dict[str, dict[str, Any]] = {}
    log.info(f"[pipeline] {config.name}: MLflow run {parent} at {tracker.uri}; artifacts under {root}")
    error: BaseException | None = None
    locks = ExitStack()  # one lock per stage output being computed, released when it is committed
    try:
        for step in plan:
            name, fp, out_dir, manifest = step.name, step.fingerprint, step.out_dir, step.manifest
            compute = step.action == "run"
            if compute:
                lock = locks.enter_context(ExitStack())
                lock.enter_context(exclusive(out_dir, f"[{name}] {out_dir}"))
                asked = name in force or bool(only)  # recompute even what is there
                done = None if asked or damage(out_dir) else _read_manifest(out_dir)
                if done is not None and done["fingerprint"] == fp:  # another run computed it while we waited
                    log.info(f"[{name}] computed by run {done['run_id']} while this run waited")
                    compute, manifest = False, done
                    lock.close()
            stage = STAGES[name]
            upstream = stage.upstream_for(config)
            upstream_runs = {u: manifests[u]["run_id"] for u, _ in upstream}
            reason = stage.gate(config, manifests) if stage.gate else None
            if reason is not None:
                gated = tracker.start(
                    name,
                    parent=parent,
                    tags={
                        "zoomvit.run_type": "stage",
                        "stage": name,
                        "fingerprint": fp,
                        "cache": "gated",
                        "failure_reason": reason,
                    },
                )
                result.stages[name] = {
                    "stage": name,
                    "run_id": gated,
                    "fingerprint": fp,
                    "cache": "gated",
                    "reason": reason,
                    "upstream": [],
                }
                tracker.tags(parent, {"failure_reason": f"{name}: {reason}"})
                gate_error = QualityGateFailed(f"stage {name!r} did not run: {reason}")
                tracker.end(gated, error=gate_error)
                log.info(f"[{name}] stopped by a quality gate: {reason}")
                raise gate_error
            tags = {
                "zoomvit.run_type": "stage",
                "stage": name,
                "fingerprint": fp,
                "cache": "miss" if compute else "hit",
                **{f"upstream.{u}": rid for u, rid in upstream_runs.items()},
            }
            if not compute:
                tags["source_run"] = manifest["run_id"]
            run_id = tracker.start(name, parent=parent, tags=tags)
            tracker.params(run_id, flatten(section(config, name)))  # each stage's config section is its own
            node = {
                "stage": name,
                "run_id": run_id,
                "fingerprint": fp,
                "cache": tags["cache"],
                "upstream": [{"stage": u, "artifact": a, "run_id": upstream_runs[u]} for u, a in upstream],
            }
            result.stages[name] = node
            if not compute:
                node.update(out_dir=manifest["out_dir"], source_run=manifest["run_id"])
                manifests[name] = manifest
                tracker.metrics(run_id, manifest.get("metrics", {}))
                tracker.end(run_id)
                log.info(f"[{name}] cache hit ({fp[:16]}) from run {manifest['run_id']}")
                continue
            log.info(f"[{name}] start (cache miss, {fp[:16]}) -> {out_dir}")
            start = time.perf_counter()
            try:
                if (out_dir / MANIFEST).exists():  # forced or --only: recompute, never resume a finished output
                    shutil.rmtree(out_dir)
                out_dir.mkdir(parents=True, exist_ok=True)
                ctx = StageContext(
                    config=config,
                    out_dir=out_dir,
                    upstream=manifests,
                    fingerprint=fp,
                    tracking={"uri": tracker.uri, "run_id": run_id},
                    splits=splits,
                )
                outputs = stage.run(ctx)
                if outputs.get("history"):  # epochs the worker could not deliver (tracking server outage, restart)
                    tracker.backfill_history(run_id, outputs["history"])
                manifest = {
                    "stage": name,
                    "fingerprint": fp,
                    "run_id": run_id,
                    "out_dir": str(out_dir),
                    "seconds": time.perf_counter() - start,
                    **outputs,
                }
                manifest["file_sizes"] = {
                    key: (out_dir / rel).stat().st_size
                    for key, rel in manifest["files"].items()
                    if (out_dir / rel).is_file()
                }
                _log_stage(tracker, run_id, config, manifest, manifests, shards, train_paths)
                for key in stage.parent_artifacts:
                    tracker.artifact(parent, out_dir / manifest["files"][key])
                write_json_durably(out_dir / MANIFEST, manifest)
                lock.close()
            except BaseException as err:
                node["cache"] = "failed"
                tracker.end(run_id, error=err)
                raise
            tracker.end(run_id)
            manifests[name] = manifest
            node["out_dir"] = str(out_dir)
            log.info(
                f"[{name}] done in {manifest['seconds']:.1f}s "
                + " ".join(f"{k}={v:.4g}" for k, v in list(manifest["metrics"].items())[:8] if isinstance(v, float)),
            )
    except BaseException as err:
        error = err
        raise
    finally:
        locks.close()
        if not isinstance(error, KeyboardInterrupt):  # a stopped job has seconds before SIGKILL: end runs first
            _write_lineage(tracker, parent, config, result, root)
        if error is None:
            result.warnings = near_chance(config, manifests)
            if result.warnings:
                tracker.tags(parent, {"warning.near_chance": "; ".join(result.warnings)})
            for line in result.warnings:
                log.warning(f"[pipeline] WARNING: {line}")
        tracker.end(parent, error=error)
    return result


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
        if row["model"].startswith("zoomvit_control"):
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


def _log_stage(
    tracker: Tracker,
    run_id: str,
    config: PipelineConfig,
    manifest: dict[str, Any],
    upstream: dict[str, dict[str, Any]],
    shards,
    train_paths,
) -> None:
    name = manifest["stage"]
    stage = STAGES[name]
    if "history" not in manifest:  # training stages: rank 0 already logged every epoch into this run
        tracker.metrics(run_id, manifest["metrics"])
    tracker.params(run_id, {"out_dir": manifest["out_dir"], "fingerprint": manifest["fingerprint"]})
    out_dir = Path(manifest["out_dir"])
    if stage.reads_shards:
        tracker.dataset_input(
            run_id,
            name="shards",
            source=str(Path(train_paths[0]).parent),
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

        tracker.artifact(run_id, out_dir / RELEVANCE_MANIFEST)
    if stage.load_model:
        weights = out_dir / manifest["files"]["weights"]
        tracker.model(run_id, stage.load_model(config, weights), name)
        tracker.artifact(run_id, weights, "weights")
    for key in ("evaluation", "figure", "frontier"):
        if key in manifest["files"]:
            tracker.artifact(run_id, out_dir / manifest["files"][key])


def _write_lineage(tracker: Tracker, parent: str, config: PipelineConfig, result: PipelineResult, root: Path) -> None:
    lineage = {"pipeline_run": parent, "config_hash": config_hash(config), "stages": result.stages}
    out = root / "lineage" / parent
    out.mkdir(parents=True, exist_ok=True)
    (out / LINEAGE).write_text(json.dumps(lineage, indent=2))
    if result.stages:
        lineage_picture(lineage, out / "lineage.png")
        tracker.artifact(parent, out / "lineage.png")
    tracker.artifact(parent, out / LINEAGE)


def _cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}
