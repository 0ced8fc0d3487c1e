"""Shard lists: brace patterns, globs, directories and URLs (local, s3://, gs://, any fsspec)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from braceexpand import braceexpand

from zoomvit.errors import UserError

log = logging.getLogger(__name__)


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
            f"{url!r} needs the filesystem for {_protocol(url)}:// ({err}): pip install 'zoomvit[cloud]'"
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


def shard_lengths(info: Any) -> dict[str, int]:
    """The per-shard sample counts an ``_info.json`` gives, by file name: timm's exports' and the demo
    generator's ``splits.<split>.filenames`` with ``shard_lengths``, or a ``shardlist`` of entries with
    ``url`` or ``filename`` and ``num_samples`` or ``nsamples`` (webdataset's shard index). Entries
    that are not a name and a non-negative int are ignored; an info without counts gives ``{}``."""
    pairs: list[tuple[Any, Any]] = []
    splits = info.get("splits") if isinstance(info, dict) else None
    for split in splits.values() if isinstance(splits, dict) else ():
        if isinstance(split, dict) and isinstance(split.get("filenames"), list):
            pairs.extend(zip(split["filenames"], split.get("shard_lengths") or []))
    shardlist = info.get("shardlist") if isinstance(info, dict) else None
    for entry in shardlist if isinstance(shardlist, list) else ():
        if isinstance(entry, dict):
            name = entry.get("filename", entry.get("url"))
            pairs.append((name, entry.get("num_samples", entry.get("nsamples"))))
    return {
        name.rsplit("/", 1)[-1]: count
        for name, count in pairs
        if isinstance(name, str) and isinstance(count, int) and not isinstance(count, bool) and count >= 0
    }


def _by_dir(paths: Sequence[str]) -> dict[str, list[str]]:
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        by_dir.setdefault(path.rsplit("/", 1)[0] if "/" in path else ".", []).append(path)
    return by_dir


def expected_samples(paths: Sequence[str]) -> dict[str, int]:
    """The sample count ``_info.json`` gives for each shard that has one, keyed as Ray's readers name
    the shard (:func:`shard_key`; a local path also by its absolute path). A missing or unreadable
    ``_info.json`` gives no counts for its directory (it is optional; a warning for an unreadable one)."""
    expected: dict[str, int] = {}
    for shard_dir, shard_paths in _by_dir(paths).items():
        try:
            lengths = shard_lengths(read_info(shard_dir))
        except (OSError, ValueError) as err:
            log.warning("%s/_info.json is unreadable (%s): its shards' sample counts are not checked", shard_dir, err)
            continue
        for path in shard_paths:
            count = lengths.get(path.rsplit("/", 1)[-1])
            if count is not None:
                expected[shard_key(path)] = count
                if not is_url(path):
                    expected[os.path.abspath(shard_key(path))] = count
    return expected


def sample_count(paths: Sequence[str]) -> int:
    """How many samples the shards hold, from the ``_info.json`` beside them (:func:`shard_lengths`);
    ValueError when it does not say."""
    total = 0
    for shard_dir, shard_paths in _by_dir(paths).items():
        names = [p.rsplit("/", 1)[-1] for p in shard_paths]
        lengths = shard_lengths(read_info(shard_dir) or {})
        missing = [n for n in names if n not in lengths]
        if missing:
            raise UserError(
                f"no sample count for {missing[0]!r} in {shard_dir}/_info.json (splits.*.filenames and shard_lengths, "
                "or a shardlist): streamed training needs one to size its epochs; "
                "or set data.decoded to shared or per_stage"
            )
        total += sum(lengths[n] for n in names)
    return total


def is_url(path: str) -> bool:
    """A remote location (``s3://``, ``gs://``, ...), not a local path or a ``file://`` URL."""
    return _protocol(path) not in (None, "file")


def local_path(path: str) -> Path:
    """A local path or ``file://`` URL as an absolute path."""
    return Path(path.removeprefix("file://")).resolve()


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
