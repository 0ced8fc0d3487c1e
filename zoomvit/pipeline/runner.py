"""Executing a run's plan (``pipeline/plan.py``): the cache, the per-output locks and MLflow lineage.

Every stage gets a nested MLflow run under the pipeline's parent run, hit or miss; a computed stage
commits its output by writing its manifest last, durably, while it holds the output's lock.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zoomvit.config import PipelineConfig
from zoomvit.data.shards import ShardInfo
from zoomvit.errors import UserError
from zoomvit.home import default_dir, in_job_working_dir
from zoomvit.locks import OutputLock, exclusive, read_or_claim
from zoomvit.pipeline.cache import StageCache, Writer, open_cache
from zoomvit.pipeline.plan import (
    MissingUpstream,
    PlannedStage,
    config_hash,
    output_records,
    plan_run,
    section,
    shards_of,
)
from zoomvit.pipeline.records import (
    DRIVER_LOCK_TAG,
    end_orphaned_runs,
    headline_metrics,
    lineage_from_run,
    log_stage,
    near_chance,
    shards_source,
    write_lineage,
)
from zoomvit.pipeline.runtime import sigterm_unwinds
from zoomvit.pipeline.stage_table import STAGES, QualityGateFailed, StageContext
from zoomvit.provenance import resolve_source
from zoomvit.tracking.registry import CANDIDATE, move_alias, registered_name
from zoomvit.tracking.runs import Tracker, flatten, resolve_tracking_uri, shards_digest, ui_url

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run_id: str
    tracking_uri: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> lineage node
    warnings: list[str] = field(default_factory=list)  # said plainly at the end of the run
    ui_url: str | None = None  # the parent run in the MLflow UI's model-training view (an http server)

    @property
    def computed(self) -> list[str]:
        return [n for n, s in self.stages.items() if s["cache"] == "miss"]


def ensure_demo_data(config: PipelineConfig, hold: ExitStack | None = None) -> None:
    """Generate the demo dataset into ``data.root`` when the config asks for it and it is missing,
    or when the one there was generated with other settings (its ``_info.json`` says so). Runs
    started together wait for each other: one generates, the others find it done. ``hold``: keep a
    shared lock on the data until that stack closes, so no other run regenerates it meanwhile."""
    demo, root = config.data.demo, config.data.root
    if demo is None or root is None:
        return
    with ExitStack() as scope:
        lock = scope.enter_context(OutputLock(Path(root).resolve(), f"[data] {root}"))
        if read_or_claim(lock, lambda: _demo_data_ready(config, demo, root)) is None:
            _generate_demo_data(demo, root)
            lock.share()
        if hold is not None:
            hold.enter_context(scope.pop_all())


def _demo_wanted(demo) -> dict[str, Any]:
    return {
        "train": demo.train,
        "val": demo.val,
        "image_size": demo.image_size,
        "seed": demo.seed,
        "samples_per_shard": demo.samples_per_shard,
        "photo_clutter": demo.photo_clutter,
        "difficulty": demo.effective_difficulty,
        "style": demo.style,
    }


def _demo_data_ready(config: PipelineConfig, demo, root: str) -> bool | None:
    """True when ``root`` holds the demo data these settings generate; None when it must be (re)generated."""
    wanted = _demo_wanted(demo)
    try:
        config.data.shard_paths("train")
        config.data.shard_paths("val")
    except ValueError:
        return None  # no shards yet: generate them
    from zoomvit.data.demo import is_demo_dataset

    if not is_demo_dataset(root):
        raise UserError(
            f"data.root {root!r} holds shards that the demo generator did not write, and data.demo asks for "
            "demo data there: refusing to overwrite them. Remove data.demo to train on these shards, or point "
            "data.root at another directory for the demo data."
        )
    generator = json.loads((Path(root) / "_info.json").read_text()).get("generator", {})
    if all(generator.get(k) == v for k, v in wanted.items()):
        return True
    log.info(f"[data] the demo dataset in {root} was generated with other settings; regenerating it")
    return None


def _generate_demo_data(demo, root: str) -> None:
    from zoomvit.data.demo import generate_demo_dataset

    log.info(
        f"[data] generating the demo dataset in {root} ({demo.train} train / {demo.val} val, "
        f"{demo.image_size}px, difficulty {demo.effective_difficulty})",
    )
    generate_demo_dataset(root, **_demo_wanted(demo))


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
    with ExitStack() as holds:  # shared locks on the data and every output this run reads, until it ends
        ensure_demo_data(config, holds)
        tracker = Tracker(resolve_tracking_uri(config.tracking.uri), config.tracking.experiment)
        shards, cache = shards_of(config), open_cache(config)
        reused = lineage_from_run(tracker, from_run)["stages"] if from_run else {}
        plan = plan_run(config, shards, cache, only=only, force=force, reused=reused)
        for step in plan:
            if step.action == "missing":
                raise MissingUpstream(
                    f"stage {step.name!r} has no cached output for this configuration (fingerprint "
                    f"{step.fingerprint[:16]}), and {step.why}"
                )
        run = PipelineRun(config, tracker, shards, cache, recompute=(*force, *only))
        return run.execute(plan, only, from_run, holds)


class PipelineRun:
    """Executes a plan: the parent MLflow run, then per stage its quality gate, a cache hit or the
    computation under the output's lock, each with a nested run; lineage and warnings at the end."""

    def __init__(
        self, config: PipelineConfig, tracker: Tracker, shards: Sequence[ShardInfo], cache: StageCache, recompute
    ) -> None:
        from zoomvit.train.data import DecodedSplits

        self.config, self.tracker, self.shards, self.cache = config, tracker, shards, cache
        self.root = cache.root  # this machine's side of the cache: staging, locks, driver records, lineage
        self.recompute = frozenset(recompute)  # --force / --only: recompute even what another run committed
        self.splits = DecodedSplits()  # the stages of one run share each split's decoded images
        self.manifests: dict[str, dict[str, Any]] = {}
        self.parent = ""
        self.result = PipelineResult(run_id="", tracking_uri=tracker.uri)

    def execute(
        self, plan: list[PlannedStage], only: Sequence[str], from_run: str | None, holds: ExitStack
    ) -> PipelineResult:
        """``holds``: where each stage output's lock goes (exclusive while it is computed, then shared),
        released when the caller's run ends: an output is never deleted while a run still reads it."""
        self._start_parent(only, from_run, holds)
        error: BaseException | None = None
        try:
            for step in plan:
                self._stage(step, holds)
        except BaseException as err:
            error = err
            raise
        finally:
            self._finish(error)
        return self.result

    def _start_parent(self, only: Sequence[str], from_run: str | None, holds: ExitStack) -> None:
        config, tracker = self.config, self.tracker
        driver = self.root / ".drivers" / uuid.uuid4().hex  # held until the run ends: a free one means a dead driver
        holds.enter_context(exclusive(driver, "[pipeline] driver"))
        tags = {
            "zoomvit.run_type": "pipeline",
            **resolve_source().tags(),  # the commit, also under `ray job submit` (handed over by the submitter)
            "config_hash": config_hash(config),
            DRIVER_LOCK_TAG: f"{driver}.lock",
        }
        self.parent = self.result.run_id = tracker.start(config.name, tags=tags)
        holds.callback(Path(f"{driver}.lock").unlink, missing_ok=True)
        if orphans := end_orphaned_runs(tracker, self.root):
            log.info(f"[pipeline] ended {len(orphans)} run(s) left RUNNING by a driver that died, as KILLED")
        dumped = config.model_dump(mode="json")
        tracker.params(self.parent, flatten(dumped))
        tracker.client.log_text(self.parent, yaml.safe_dump(dumped, sort_keys=False), "config.yaml")
        tracker.tags(
            self.parent,
            {"cluster_resources": json.dumps(_cluster_resources()), "only": ",".join(only), "from_run": from_run or ""},
        )
        tracker.dataset_input(
            self.parent,
            name="shards",
            source=shards_source(config),
            digest=shards_digest(self.shards),
            context="train+val shards",
        )
        self.result.ui_url = ui_url(tracker.uri, tracker.experiment_id, self.parent)
        where = self.result.ui_url or f"at {tracker.uri}"
        log.info(f"[pipeline] {config.name}: MLflow run {self.parent} {where}; artifacts under {self.cache.describe()}")

    def _stage(self, step: PlannedStage, holds: ExitStack) -> None:
        forced = step.action == "run" and step.name in self.recompute
        holder = f"pipeline run {self.parent} on {socket.gethostname()}"
        manifest, writer = self.cache.acquire(step, forced=forced, holder=holder, holds=holds)
        stage = STAGES[step.name]
        reason = stage.gate(self.config, self.manifests) if stage.gate else None
        if reason is not None:
            self._gated(step, reason)
        if writer is None:
            self._cached(step, manifest)
        else:
            self._compute(step, writer)
        if stage.promotes and self.config.tracking.register_models:
            self._promote(step)

    def _promote(self, step: PlannedStage) -> None:
        """Point the registry's candidate alias at the model versions this stage scored."""
        moved = {}
        for upstream, _ in STAGES[step.name].upstream_for(self.config):
            if STAGES[upstream].model_spec is None:
                continue
            name = registered_name(self.config.tracking.experiment, upstream)
            version = move_alias(self.tracker, name, self.manifests[upstream]["run_id"])
            if version is not None:
                moved[f"{CANDIDATE}.{name}"] = version
        if moved:
            self.tracker.tags(self.parent, moved)
            log.info(
                f"[{step.name}] registry alias {CANDIDATE!r}: "
                + ", ".join(f"{k[len(CANDIDATE) + 1 :]} v{v}" for k, v in moved.items())
            )

    def _stage_run(self, step: PlannedStage, cache: str, **tags: str) -> tuple[str, dict[str, Any]]:
        """The stage's nested run and its lineage node."""
        upstream = STAGES[step.name].upstream_for(self.config)
        upstream_runs = {u: self.manifests[u]["run_id"] for u, _ in upstream}
        run_tags = {
            "zoomvit.run_type": "stage",
            "stage": step.name,
            "fingerprint": step.fingerprint,
            "cache": cache,
            **{f"upstream.{u}": rid for u, rid in upstream_runs.items()},
            **tags,
        }
        run_id = self.tracker.start(step.name, parent=self.parent, tags=run_tags)
        node = {
            "stage": step.name,
            "run_id": run_id,
            "fingerprint": step.fingerprint,
            "cache": cache,
            "upstream": [{"stage": u, "artifact": a, "run_id": upstream_runs[u]} for u, a in upstream],
        }
        self.result.stages[step.name] = node
        return run_id, node

    def _gated(self, step: PlannedStage, reason: str) -> None:
        run_id, node = self._stage_run(step, "gated", failure_reason=reason)
        node.update(reason=reason, upstream=[])
        self.tracker.tags(self.parent, {"failure_reason": f"{step.name}: {reason}"})
        error = QualityGateFailed(f"stage {step.name!r} did not run: {reason}")
        self.tracker.end(run_id, error=error)
        log.info(f"[{step.name}] stopped by a quality gate: {reason}")
        raise error

    def _cached(self, step: PlannedStage, manifest: dict[str, Any]) -> None:
        run_id, node = self._stage_run(step, "hit", source_run=manifest["run_id"])
        self.tracker.params(run_id, flatten(section(self.config, step.name)))
        node.update(out_dir=manifest["out_dir"], source_run=manifest["run_id"])
        self.manifests[step.name] = manifest
        self.tracker.metrics(run_id, manifest.get("metrics", {}))
        self.tracker.end(run_id)
        log.info(f"[{step.name}] cache hit ({step.fingerprint[:16]}) from run {manifest['run_id']}")

    def _compute(self, step: PlannedStage, writer: Writer) -> None:
        name, out_dir, tracker = step.name, writer.out_dir, self.tracker
        run_id, node = self._stage_run(step, "miss")
        tracker.params(run_id, flatten(section(self.config, name)))  # each stage's config section is its own
        log.info(f"[{name}] start (cache miss, {step.fingerprint[:16]}: {step.why}) -> {out_dir}")
        start = time.perf_counter()
        stage = STAGES[name]
        try:
            io = writer.begin(
                run_id, recompute=name in self.recompute, repairs_in_place=stage.repairs_in_place, parts=stage.parts
            )
            ctx = StageContext(
                config=self.config,
                out_dir=out_dir,
                upstream=self.manifests,
                fingerprint=step.fingerprint,
                tracking={"uri": tracker.uri, "run_id": run_id},
                splits=self.splits,
                checkpoints=io.checkpoints,
                on_part=io.on_part,
            )
            outputs = stage.run(ctx)
            if outputs.get("history"):  # epochs the worker could not deliver (tracking server outage, restart)
                tracker.backfill_history(run_id, outputs["history"])
            manifest = {
                "stage": name,
                "fingerprint": step.fingerprint,
                "run_id": run_id,
                "out_dir": io.out_dir,
                "seconds": time.perf_counter() - start,
                **outputs,
            }
            files = {key: out_dir / rel for key, rel in manifest["files"].items()}
            manifest["file_sizes"], manifest["file_hashes"] = output_records(files)  # checked on every hit
            log_stage(tracker, run_id, self.config, manifest, self.manifests, self.shards, staged=out_dir)
            for key in stage.parent_artifacts:
                tracker.artifact(self.parent, out_dir / manifest["files"][key])
            manifest = writer.commit(manifest)
            if manifest["run_id"] != run_id:
                tracker.tags(run_id, {"zoomvit.superseded_by": manifest["run_id"]})
        except BaseException as err:
            node["cache"] = "failed"
            tracker.end(run_id, error=err)
            raise
        tracker.end(run_id)
        self.manifests[name] = manifest
        node["out_dir"] = manifest["out_dir"]
        log.info(
            f"[{name}] done in {manifest['seconds']:.1f}s "
            + " ".join(f"{k}={v:.4g}" for k, v in list(manifest["metrics"].items())[:8] if isinstance(v, float)),
        )

    def _finish(self, error: BaseException | None) -> None:
        if not self.parent:
            return
        if not isinstance(error, KeyboardInterrupt):  # a stopped job has seconds before SIGKILL: end runs first
            written = write_lineage(self.tracker, self.parent, self.config, self.result.stages, self.root)
            try:
                self.cache.keep(written)
            except Exception as err:  # noqa: BLE001 - a copy: MLflow holds the lineage, and every stage committed
                log.warning(f"[pipeline] could not copy the lineage beside the cache ({err}); MLflow has it")
        if error is None:
            try:
                self.tracker.metrics(self.parent, headline_metrics(self.manifests))
            except Exception as err:  # noqa: BLE001 - every stage committed and logged its own figures
                log.warning(f"[pipeline] could not log the headline metrics to {self.tracker.uri} ({err})")
            self.result.warnings = near_chance(self.config, self.manifests)
            if self.result.warnings:
                self.tracker.tags(self.parent, {"warning.near_chance": "; ".join(self.result.warnings)})
            for line in self.result.warnings:
                log.warning(f"[pipeline] WARNING: {line}")
        self.tracker.end(self.parent, error=error)


def _cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}
