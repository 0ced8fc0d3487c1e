"""The stage cache: one interface (:mod:`.interface`), two stores, one answer to whether an output is
committed (:mod:`.committed`).

:class:`~zoomvit.pipeline.cache.local.LocalCache` keeps entries in a directory and coordinates runs
with file locks (one host, or NFSv4); :class:`~zoomvit.pipeline.cache.object_store.ObjectStoreCache`
keeps them in a bucket and coordinates machines with claims, epochs and read leases
(:mod:`~zoomvit.pipeline.cache.bucket`). The runner never asks which one it has. Nothing here imports
the training code or MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from zoomvit.data.shards import filesystem, is_url, local_path
from zoomvit.home import default_dir
from zoomvit.pipeline.cache.bucket import BucketCache, staging_root
from zoomvit.pipeline.cache.committed import MANIFEST, committed_output
from zoomvit.pipeline.cache.interface import (
    Manifest,
    StageCache,
    StageIO,
    Step,
    Writer,
    checkpoint_base,
    remove_tree,
)
from zoomvit.pipeline.cache.local import LocalCache
from zoomvit.pipeline.cache.object_store import ObjectStoreCache

if TYPE_CHECKING:
    from zoomvit.config import PipelineConfig

__all__ = [
    "MANIFEST",
    "BucketCache",
    "LocalCache",
    "Manifest",
    "ObjectStoreCache",
    "StageCache",
    "StageIO",
    "Step",
    "Writer",
    "artifact_bucket",
    "artifact_root",
    "checkpoint_base",
    "checkpoint_location",
    "committed_output",
    "open_cache",
    "remove_tree",
]


def chosen_root(config: PipelineConfig) -> str | None:
    return config.artifact_root or os.environ.get("ZOOMVIT_ARTIFACT_ROOT")


def artifact_root(config: PipelineConfig) -> Path:
    """Where this machine keeps the stage cache: the config's artifact root, else $ZOOMVIT_ARTIFACT_ROOT,
    else ``runs`` under :func:`~zoomvit.home.default_dir` (the working directory; ``~/.zoomvit`` inside a
    ``ray job submit`` working-dir copy). A root in object storage (:func:`artifact_bucket`) is the cache
    of record; stages then compute and lock in its :func:`~zoomvit.pipeline.cache.bucket.staging_root` here."""
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
    root, bucket = artifact_root(config), artifact_bucket(config)
    if bucket is None:
        return LocalCache(root, config.checkpoint_root)
    return ObjectStoreCache(root, config.checkpoint_root, bucket)


def checkpoint_location(config: PipelineConfig, stage: str, fingerprint: str) -> str | None:
    """Where a stage's training checkpoints go when ``checkpoint_root`` moves them out of its output:
    ``<checkpoint_root>/<stage>/<fingerprint>``; a rerun of the same stage resumes from them."""
    return checkpoint_base(config.checkpoint_root, stage, fingerprint)
