"""What a run will do, decided before anything runs: each stage's fingerprint, the cache's state, the plan.

A stage's fingerprint hashes its name, the config sections it reads (without resource-only settings;
checkpoints by content), its upstream fingerprints, the input shards' identity (paths, sizes,
mtimes/etags), the package version and a digest of its source. Its outputs live in
``<artifact_root>/<stage>/<fingerprint>/`` with a ``manifest.json`` written last: an intact manifest
whose listed files still have the sizes and content hashes it recorded means a cache hit
(:func:`~zoomvit.pipeline.cache.committed.committed_output`). Nothing here starts Ray or MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import zoomvit
from zoomvit.config import PipelineConfig
from zoomvit.data.shards import ShardInfo, is_url, shard_infos
from zoomvit.errors import UserError
from zoomvit.integrity import content_hash, record
from zoomvit.pipeline.cache.committed import MANIFEST, committed_output, location_of
from zoomvit.pipeline.stage_table import STAGES
from zoomvit.tracking.runs import shards_digest

if TYPE_CHECKING:
    from zoomvit.pipeline.cache.interface import StageCache


class MissingUpstream(UserError):
    """``--only`` named a stage whose upstream output is not in the cache."""


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
            "resources",
        }
    ),  # fmt: skip
    "train": frozenset({"cpus_per_worker", "resources", "max_failures"}),
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


def file_digest(path: str) -> str:
    """A local file's content digest (read once while its stat is unchanged); a remote file's metadata
    (ETag, size, mtime as its store reports them); the path itself when it cannot be read."""
    if not is_url(path):
        local = path.split("://", 1)[-1]
        try:
            return content_hash(local)
        except OSError:
            return path
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


def output_records(files: dict[str, Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a stage's manifest records of its listed outputs (key -> path) at commit: ``(file_sizes,
    file_hashes)``; a listed directory (the relevance maps, ``.``): per file inside it, the manifest aside."""
    return record(files, skip=frozenset({MANIFEST}))


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
    cache: StageCache | Path,
    *,
    only: Sequence[str] = (),
    force: Sequence[str] = (),
    reused: dict[str, dict[str, Any]] | None = None,
) -> list[PlannedStage]:
    """The stages a run needs, in order, each with its fingerprint and what will happen to it. Reads
    only the config, the shards' identities and the cache's manifests (no Ray, no MLflow).
    ``cache``: the stage cache (:func:`~zoomvit.pipeline.cache.open_cache`), or a local cache's root.
    ``reused``: lineage nodes of an earlier run (``--from-run``) whose outputs may stand in."""
    if isinstance(cache, Path):
        from zoomvit.pipeline.cache.local import LocalCache

        cache = LocalCache(cache, None)
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
        out_dir = cache.root / name / fp[:16]
        manifest, damaged = committed_output(cache.location(name, fp))
        if manifest is None and name in reused and reused[name]["fingerprint"] == fp:
            manifest, _ = committed_output(location_of(reused[name]["out_dir"]))
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
