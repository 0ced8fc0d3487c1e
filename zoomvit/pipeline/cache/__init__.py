"""The stage cache: one interface, two stores.

A run reads as plan, then for each stage ``acquire`` (the committed output under a read hold, or a
:class:`Writer` holding the right to compute it), compute into ``writer.out_dir``, ``writer.commit``.
:class:`~zoomvit.pipeline.cache.local.LocalCache` keeps entries in a directory and coordinates runs
with file locks (one host, or NFSv4); :class:`~zoomvit.pipeline.cache.object_store.ObjectStoreCache`
keeps them in a bucket and coordinates machines with claims, epochs and read leases
(:mod:`~zoomvit.pipeline.cache.bucket`). The runner never asks which one it has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from zoomvit.data.shards import filesystem, is_url, local_path
from zoomvit.pipeline.cache.bucket import BucketCache, staging_root
from zoomvit.tracking.runs import default_dir

if TYPE_CHECKING:
    from zoomvit.config import PipelineConfig
    from zoomvit.pipeline.plan import PlannedStage
    from zoomvit.train.loop import Checkpoints

Manifest = dict[str, Any]


class Writer(Protocol):
    """The right to compute one stage's output, held until the run ends."""

    out_dir: Path  # where the stage writes its files on this machine

    def begin(self, run_id: str, *, recompute: bool, repairs_in_place: bool, parts: str | None) -> StageIO:
        """Prepare ``out_dir``: wiped when a committed output is recomputed, else kept to resume from."""
        ...

    def commit(self, manifest: Manifest) -> Manifest:
        """Commit the staged output; the manifest that stands (another run's, if it committed first)."""
        ...


@dataclass(frozen=True)
class StageIO:
    """What a writer hands the stage it computes: where its manifest says the output lives, where its
    training checkpoints go (and their fence), and what to call with each committed part's files."""

    out_dir: str
    checkpoints: Checkpoints | None = None
    on_part: Callable[[list[Path]], None] | None = None


class StageCache(Protocol):
    root: Path  # where stages compute (and lock) on this machine

    def location(self, stage: str, fingerprint: str) -> Path | str:
        """Where the entry is committed: a directory, or a bucket entry."""
        ...

    def acquire(
        self, step: PlannedStage, *, forced: bool, holder: str, holds: ExitStack
    ) -> tuple[Manifest | None, Writer | None]:
        """``(manifest, None)``: the committed output, read-held until ``holds`` closes; or ``(None,
        writer)``: this run computes it (it waited for any other run computing it)."""
        ...

    def keep(self, paths: list[Path]) -> None:
        """Copy run records (the lineage) beside the entries, where the store is shared."""
        ...

    def describe(self) -> str: ...


def chosen_root(config: PipelineConfig) -> str | None:
    return config.artifact_root or os.environ.get("ZOOMVIT_ARTIFACT_ROOT")


def artifact_root(config: PipelineConfig) -> Path:
    """Where this machine keeps the stage cache: the config's artifact root, else $ZOOMVIT_ARTIFACT_ROOT,
    else ``runs`` under :func:`default_dir` (the working directory; ``~/.zoomvit`` inside a ``ray job
    submit`` working-dir copy). A root in object storage (:func:`artifact_bucket`) is the cache of
    record; stages then compute and lock in its :func:`~zoomvit.pipeline.cache.bucket.staging_root` here."""
    chosen = chosen_root(config)
    if chosen and is_url(chosen):
        filesystem(chosen)  # a missing s3fs / gcsfs names the extra before anything runs
        return staging_root(chosen)
    return local_path(chosen) if chosen else default_dir() / "runs"


def artifact_bucket(config: PipelineConfig) -> BucketCache | None:
    """The stage cache in object storage, when the artifact root is a URL (``s3://``, ``gs://``)."""
    chosen = chosen_root(config)
    return BucketCache(chosen.rstrip("/")) if chosen and is_url(chosen) else None


def open_cache(config: PipelineConfig) -> StageCache:
    """The configured stage cache (module docstring)."""
    from zoomvit.pipeline.cache.local import LocalCache
    from zoomvit.pipeline.cache.object_store import ObjectStoreCache

    root, bucket = artifact_root(config), artifact_bucket(config)
    if bucket is None:
        return LocalCache(root, config.checkpoint_root)
    return ObjectStoreCache(root, config.checkpoint_root, bucket)


def checkpoint_location(config: PipelineConfig, stage: str, fingerprint: str) -> str | None:
    """Where a stage's training checkpoints go when ``checkpoint_root`` moves them out of its output:
    ``<checkpoint_root>/<stage>/<fingerprint>``; a rerun of the same stage resumes from them."""
    return checkpoint_base(config.checkpoint_root, stage, fingerprint)


def checkpoint_base(root: str | None, stage: str, fingerprint: str) -> str | None:
    if root is None:
        return None
    if not is_url(root):
        root = str(local_path(root))
    return f"{root.rstrip('/')}/{stage}/{fingerprint}"


def remove_tree(location: str) -> None:
    """Delete a directory tree, local or in object storage; nothing when it is not there."""
    fs = filesystem(location)
    if fs.exists(location):
        fs.rm(location, recursive=True)
