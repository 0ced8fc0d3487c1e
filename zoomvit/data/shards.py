"""Shard lists: brace patterns, globs, directories and URLs (local, s3://, gs://, any fsspec)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from braceexpand import braceexpand

from zoomvit.errors import UserError


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    path: str
    size: int
    mtime: str | None


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of a path or URL; a missing implementation (s3fs, gcsfs) names the extra."""
    try:
        return fsspec.core.url_to_fs(url)[0]
    except ImportError as err:
        raise UserError(
            f"reading {url!r} needs the filesystem for {_protocol(url)}:// ({err}): pip install 'zoomvit[cloud]'"
        ) from err


def expand_shards(spec: str | Sequence[str], *, root: str | None = None) -> list[str]:
    """All shard paths a spec names, in sorted order; an error when it names none."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in specs:
        for pattern in braceexpand(item):
            pattern = _join(root, pattern)
            fs = filesystem(pattern)
            protocol = _protocol(pattern)
            if any(ch in pattern for ch in "*?["):
                found = fs.glob(pattern)
            elif fs.isdir(pattern):
                found = [p for p in fs.ls(pattern, detail=False) if p.endswith(".tar")]
            else:
                found = [pattern] if fs.exists(pattern) else []
                if not found:
                    raise UserError(f"shard {pattern!r} does not exist")
            paths.extend(_with_protocol(p, protocol) for p in found)
    if not paths:
        raise UserError(f"no shards match {spec!r}" + (f" under {root!r}" if root else ""))
    return sorted(dict.fromkeys(paths))


def shard_infos(paths: Sequence[str]) -> list[ShardInfo]:
    """Size and modification time (or etag) of each shard: the input's identity for fingerprints."""
    infos = []
    for path in paths:
        fs = filesystem(path)
        info: dict[str, Any] = fs.info(fs._strip_protocol(path))
        stamp = (
            info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or info.get("updated")
        )
        infos.append(ShardInfo(path=path, size=int(info.get("size") or 0), mtime=None if stamp is None else str(stamp)))
    return infos


def shard_key(path: str) -> str:
    """A shard's path without its protocol: what Ray's file readers report as the path."""
    return path.split("://", 1)[-1]


def read_info(shard_dir: str) -> dict[str, Any] | None:
    """The ``_info.json`` timm's WebDataset exports (and the demo generator) put beside the shards."""
    path = _join(shard_dir, "_info.json")
    fs, _, (resolved,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(resolved):
        return None
    with fs.open(resolved, "r") as f:
        return json.load(f)


def sample_count(paths: Sequence[str]) -> int:
    """How many samples the shards hold, from the ``_info.json`` beside them (``shard_lengths`` per
    file name, as timm's exports and the demo generator write it); ValueError when it does not say."""
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        by_dir.setdefault(path.rsplit("/", 1)[0] if "/" in path else ".", []).append(path.rsplit("/", 1)[-1])
    total = 0
    for shard_dir, names in by_dir.items():
        info = read_info(shard_dir) or {}
        lengths: dict[str, int] = {}
        for split in info.get("splits", {}).values():
            lengths.update(zip(split.get("filenames", []), split.get("shard_lengths", [])))
        missing = [n for n in names if n not in lengths]
        if missing:
            raise UserError(
                f"no sample count for {missing[0]!r} in {shard_dir}/_info.json (splits.*.filenames and shard_lengths): "
                "streamed training needs one to size its epochs; or set data.decoded to shared or per_stage"
            )
        total += sum(lengths[n] for n in names)
    return total


def _protocol(path: str) -> str | None:
    return path.split("://", 1)[0] if "://" in path else None


def _with_protocol(path: str, protocol: str | None) -> str:
    if protocol is None or protocol == "file":
        return os.path.abspath(path.split("://", 1)[-1])
    return path if "://" in path else f"{protocol}://{path}"


def _join(root: str | None, path: str) -> str:
    if root is None or "://" in path or os.path.isabs(path):
        return path
    return root.rstrip("/") + "/" + path
