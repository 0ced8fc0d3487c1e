"""Reading an object store for the bucket cache: listings, object identities and times, the damage of
a committed entry's objects (:mod:`.committed` decides with it whether the entry stands), and the check
that the store honours create-only puts."""

from __future__ import annotations

import base64
import os
import posixpath
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from zoomvit.data.shards import filesystem
from zoomvit.errors import UserError

ATTEMPTS = "attempts"

SINGLE_PUT_BYTES = 100 * 2**20  # below it s3fs puts a file in one request (above: a multipart upload)
_verified: set[tuple[str, str | None, str]] = set()  # (object, ETag, sha256) whose stored checksum matched
_honoured: dict[str, bool] = {}  # store root -> create-only puts were found exclusive there


def entry_of(out_dir: str) -> str:
    """The cache entry an attempt's prefix (a committed manifest's ``out_dir``) belongs to."""
    entry, sep, _ = out_dir.rstrip("/").rpartition(f"/{ATTEMPTS}/")
    assert sep, f"{out_dir!r} is not an attempt prefix"
    return entry


def damage(manifest: dict[str, Any], listing: dict[str, dict[str, Any]] | None = None) -> str | None:
    """Why a committed manifest's objects differ from what was uploaded, or None. ``listing``: its
    attempt's :func:`listing`, when the caller has it already."""
    out = manifest["out_dir"]
    listing = list_objects(out) if listing is None else listing
    for key, _, name, size, etag in objects(manifest):
        info = listing.get(name)
        if info is None:
            return f"its {key} object {out}/{name} is missing"
        if isinstance(size, int) and info["size"] != size:
            return f"its {key} object {out}/{name} has {info['size']} bytes, {size} when committed"
        if etag is not None and etag_of(info) != etag:
            found = etag_of(info)
            return f"its {key} object {out}/{name} was rewritten since it was committed (ETag {found}, {etag} then)"
    return None


def upload_file(local: str, remote: str) -> None:
    """Put one file. On S3 a single-part put carries its SHA-256 (``ChecksumAlgorithm``): the store
    refuses bytes that do not match it and keeps it, for :func:`checksum_mismatch` to compare."""
    fs = filesystem(remote)
    extra = {}
    if _is_s3(fs) and os.path.getsize(local) < SINGLE_PUT_BYTES:
        extra["ChecksumAlgorithm"] = "SHA256"
    fs.put_file(local, remote, **extra)


def checksum_mismatch(manifest: dict[str, Any]) -> str | None:
    """Why an object's checksum kept by the store differs from the sha256 its manifest recorded at
    commit, or None. Objects without one (multipart uploads, other stores) rest on the ETag check. An
    object verified once (at an ETag the listing has just confirmed) is not asked again in this process:
    the plan and the stage's acquire both look an entry up."""
    fs = filesystem(manifest["out_dir"])
    if not _is_s3(fs):
        return None
    out, hashes = manifest["out_dir"], manifest.get("file_hashes", {})
    for key, inner, name, _, etag in objects(manifest):
        recorded = hashes.get(key)
        recorded = recorded.get(inner) if isinstance(recorded, dict) else recorded
        seen = (f"{out}/{name}", etag, recorded)
        if not isinstance(recorded, str) or not recorded.startswith("sha256:") or seen in _verified:
            continue
        bucket, path, _ = fs.split_path(f"{out}/{name}")
        kept = fs.call_s3("head_object", Bucket=bucket, Key=path, ChecksumMode="ENABLED").get("ChecksumSHA256")
        if kept is None or "-" in kept:
            continue
        found = base64.b64decode(kept).hex()
        if found != recorded.removeprefix("sha256:"):
            return (
                f"its {key} object {out}/{name} holds other bytes than were committed (sha256 {found}, {recorded} then)"
            )
        if etag is not None:
            _verified.add(seen)
    return None


def _is_s3(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol


def require_exclusive_creates(url: str) -> None:
    """Refuse a store whose create-only puts (S3 ``If-None-Match: *``, GCS generation 0) are not
    exclusive: of two creates of one key exactly one must win. Checked once per store and process."""
    root = bare(url).split("/", 1)[0]
    if _honoured.get(root):
        return
    fs = filesystem(url)
    probe = f"{url}/.zoomvit-probe/{uuid.uuid4().hex}"
    fs.pipe_file(probe, b"first", mode="create")
    try:
        fs.pipe_file(probe, b"second", mode="create")
        second_won = True
    except FileExistsError:
        second_won = False
    finally:
        fs.rm(probe)
    if second_won:
        raise UserError(
            f"the object store at {url} does not honour create-only puts (a second put of one key with "
            "If-None-Match: * replaced the first), so two machines could commit one output at once. Use a "
            "store that does (AWS S3, GCS, MinIO), or set artifact_root to a path on a shared filesystem "
            "(an NFSv4 mount: the local cache's file locks then coordinate the machines)."
        )
    _honoured[root] = True


def objects(manifest: dict[str, Any]) -> Iterator[tuple[str, str | None, str, Any, Any]]:
    """``(key, inner, name relative to out_dir, size, etag)`` of every object a manifest lists; a listed
    directory (the relevance maps, ``.``) names each file its record holds (``inner``; None for a file)."""
    sizes, etags = manifest.get("file_sizes", {}), manifest.get("object_etags", {})
    for key, rel in manifest["files"].items():
        size, etag = sizes.get(key), etags.get(key)
        if isinstance(size, dict):
            for inner in sorted(size):
                yield key, inner, posixpath.normpath(f"{rel}/{inner}"), size[inner], (etag or {}).get(inner)
        else:
            yield key, None, posixpath.normpath(rel), size, etag


def etags(manifest: dict[str, Any], listing: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``object_etags`` record of a manifest's objects, shaped as its ``file_sizes``."""
    out: dict[str, Any] = {}
    for key, inner, name, _, _ in objects(manifest):
        etag = etag_of(listing.get(name, {}))
        if inner is None:
            out[key] = etag
        else:
            out.setdefault(key, {})[inner] = etag
    return out


def bare(url: str) -> str:
    from fsspec.core import strip_protocol

    return strip_protocol(url).rstrip("/")


def list_objects(prefix: str) -> dict[str, dict[str, Any]]:
    """Every object under ``prefix`` (a URL, or a local path) by its path relative to it, from one
    recursive listing."""
    fs = filesystem(prefix)
    base = bare(prefix)
    fs.invalidate_cache(base)  # ask the store, not fsspec's listing cache: another run may have written since
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    return {path[len(base) + 1 :]: info for path, info in found.items() if path.startswith(base + "/")}


def etag_of(info: dict[str, Any]) -> str | None:
    """The store's identity of an object's content: S3's ETag, GCS's md5Hash or generation."""
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def mtime_of(info: dict[str, Any]) -> float:
    """When an object was last written: S3's ``LastModified``, GCS's ``updated`` (RFC 3339), a local ``mtime``."""
    value = info.get("LastModified") or info.get("updated") or info.get("mtime")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value or 0.0)
