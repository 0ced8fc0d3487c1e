"""The stage cache in object storage (``artifact_root: s3://...``, ``gs://...``, any fsspec URL).

A bucket has neither locks nor renames, so an entry commits differently from a local one. A driver
that is to compute an output first claims it (:class:`Claim`): it creates the next numbered claim
object with an exclusive write (``If-None-Match: *``; GCS: generation 0) and renews it while it
works. Another driver waits while that claim is alive, takes the output once it is committed, or
takes over a claim whose holder stopped renewing it (a dead driver; after :data:`CLAIM_TTL_S`) by
creating the next number, so two drivers never compute one output (nor write its checkpoints) at
once. The holder computes into a local staging directory (:func:`staging_root`), uploads its files
under a prefix of its own, ``attempts/<stage run id>``, then writes the entry's manifest, naming
that prefix, last, again with an exclusive write unless it replaces a damaged or forced entry. The
attempt a forced recompute supersedes stays for the runs still reading it and is deleted by a later
commit of the entry once older than :data:`GRACE_S`. A hit is checked from one listing, reading no
content: every listed object is there, with the size and the ETag it had when it was uploaded (the
local cache hashes content instead; here the store's ETag stands in). Claims expire by the store's
clock (an object's LastModified) against the driver's: clocks must agree to well within the TTL.

    <root>/<stage>/<fingerprint[:16]>/manifest.json
    <root>/<stage>/<fingerprint[:16]>/claims/<n>.json             who computes it (the highest n)
    <root>/<stage>/<fingerprint[:16]>/attempts/<run id>/...       one computation's files
    <root>/<stage>/<fingerprint[:16]>/ray/...                     Ray Train's checkpoints, resumed across attempts
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from zoomvit.data.shards import filesystem, is_url
from zoomvit.tracking.runs import default_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ATTEMPTS = "attempts"
CLAIMS = "claims"
GRACE_S = 24 * 3600.0  # a superseded attempt outlives the runs that planned with it by this much
CLAIM_TTL_S = 120.0  # a claim not renewed for this long is its dead holder's; renewed every quarter of it
POLL_S = 5.0  # how often a waiting driver looks again


def staging_root(url: str) -> Path:
    """Where a bucket root's stages compute, lock and keep their per-driver records on this machine."""
    return default_dir() / "staging" / url.replace("://", "/", 1).rstrip("/")


def entry_of(out_dir: str) -> str:
    """The cache entry an attempt's prefix (a committed manifest's ``out_dir``) belongs to."""
    entry, sep, _ = out_dir.rstrip("/").rpartition(f"/{ATTEMPTS}/")
    assert sep, f"{out_dir!r} is not an attempt prefix"
    return entry


def lookup(entry: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` for an intact committed entry, ``(None, why)`` for a damaged one, ``(None, None)``
    when nothing is committed there."""
    fs = filesystem(entry)
    try:
        manifest = json.loads(fs.cat_file(f"{entry}/{MANIFEST}"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{MANIFEST} is unreadable ({err})"
    try:
        why = damage(manifest)
    except (KeyError, TypeError, AttributeError) as err:
        why = f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    return (None, why) if why else (manifest, None)


def damage(manifest: dict[str, Any], listing: dict[str, dict[str, Any]] | None = None) -> str | None:
    """Why a committed manifest's objects differ from what was uploaded, or None. ``listing``: its
    attempt's :func:`_listing`, when the caller has it already."""
    out = manifest["out_dir"]
    listing = _listing(out) if listing is None else listing
    for key, _, name, size, etag in _objects(manifest):
        info = listing.get(name)
        if info is None:
            return f"its {key} object {out}/{name} is missing"
        if isinstance(size, int) and info["size"] != size:
            return f"its {key} object {out}/{name} has {info['size']} bytes, {size} when committed"
        if etag is not None and _etag(info) != etag:
            return (
                f"its {key} object {out}/{name} was rewritten since it was committed (ETag {_etag(info)}, {etag} then)"
            )
    return None


@dataclass(frozen=True)
class BucketCache:
    url: str  # the artifact root, without a trailing slash

    def entry(self, stage: str, fingerprint: str) -> str:
        return f"{self.url}/{stage}/{fingerprint[:16]}"

    def attempt(self, stage: str, fingerprint: str, run_id: str) -> str:
        return f"{self.entry(stage, fingerprint)}/{ATTEMPTS}/{run_id}"

    def claim(
        self,
        stage: str,
        fingerprint: str,
        holder: str,
        committed: Callable[[], dict[str, Any] | None] | None,
        *,
        held_lock: str | None = None,
    ) -> tuple[dict[str, Any] | None, Claim | None]:
        """Claim the entry for computing it: ``(None, claim)``, to hold (``with``) while computing, or
        ``(manifest, None)`` when ``committed()`` finds it committed while this driver waits for
        another's live claim. ``committed``: None to wait for the claim whatever is committed (forced).
        ``held_lock``: a lock file on this host the caller holds exclusively for the entry (the staging
        directory's); a claim made from this host under that lock is a dead driver's, free at once."""
        fs, base = filesystem(self.url), f"{self.entry(stage, fingerprint)}/{CLAIMS}"
        said = False
        while True:
            if committed is not None and (done := committed()) is not None:
                return done, None
            claims = _claims(base)
            current = max(claims, default=0)
            state = _claim_state(fs, f"{base}/{current:08d}.json", claims[current]) if current else None
            if state is not None and held_lock and _left_by_a_dead_driver_here(state, held_lock):
                state["free"] = True
            if state is None or state["free"]:
                mine = Claim(f"{base}/{current + 1:08d}.json", holder, held_lock)
                try:
                    fs.pipe_file(mine.path, mine.payload(), mode="create")
                except FileExistsError:
                    continue  # another driver took that number first: look again
                if committed is not None and (done := committed()) is not None:
                    mine.release()  # the holder committed, then released, between the first look and this claim
                    return done, None
                if state is not None and not state.get("released"):
                    log.info(f"[{stage}] took over the expired claim of {state.get('holder')} on {base}")
                return None, mine
            if not said:
                log.info(f"[{stage}] waiting for {state.get('holder')}, which is computing it ({base})")
                said = True
            time.sleep(POLL_S)

    def committed(self, stage: str, fingerprint: str) -> bool:
        """Whether the entry has a manifest at all (intact or not)."""
        fs, path = filesystem(self.url), f"{self.entry(stage, fingerprint)}/{MANIFEST}"
        fs.invalidate_cache(_bare(path))
        return fs.exists(path)

    def upload(self, staged: Path, files: list[Path], attempt: str) -> None:
        """Put staged files (paths under ``staged``) under ``attempt``, keeping their relative paths."""
        fs = filesystem(self.url)
        for path in files:
            fs.put_file(str(path), f"{attempt}/{path.relative_to(staged).as_posix()}")

    def publish(self, staged: Path, manifest: dict[str, Any], *, replace: bool) -> dict[str, Any]:
        """Upload a stage's staged output and commit it (module docstring). Returns the manifest that
        stands: this one, or the one another run committed first (its own upload is then deleted).
        ``replace``: overwrite a committed manifest (forced, or the entry was damaged)."""
        fs = filesystem(self.url)
        stage, fp = manifest["stage"], manifest["fingerprint"]
        entry, attempt = self.entry(stage, fp), self.attempt(stage, fp, manifest["run_id"])
        committed = {**manifest, "out_dir": attempt}
        present = _listing(attempt)  # the parts this run uploaded as it committed them (StageContext.on_part)
        missing = [name for _, _, name, size, _ in _objects(committed) if present.get(name, {}).get("size") != size]
        self.upload(staged, [staged / name for name in missing], attempt)
        listing = _listing(attempt)
        committed["object_etags"] = _etags(committed, listing)
        if why := damage(committed, listing):  # the store holds something else than what was staged
            raise OSError(f"stage {stage!r}: the upload to {attempt} is incomplete: {why}")
        payload = json.dumps(committed, indent=2, default=str).encode()
        try:
            fs.pipe_file(f"{entry}/{MANIFEST}", payload, mode="overwrite" if replace else "create")
        except FileExistsError:
            winner, _ = lookup(entry)
            if winner is not None and winner.get("out_dir") == attempt and winner.get("run_id") == manifest["run_id"]:
                log.info(f"[{stage}] the manifest put was retried after it landed; it names this attempt")
                self._collect_superseded(entry, keep=attempt)
                return winner
            fs.rm(attempt, recursive=True)
            if winner is None:  # committed, then damaged or removed since: this run's copy is as good
                return self.publish(staged, manifest, replace=True)
            log.info(f"[{stage}] run {winner['run_id']} committed this output first; this run's copy is discarded")
            return winner
        self._collect_superseded(entry, keep=attempt)
        return committed

    def seed(self, stage: str, fingerprint: str, staged: Path, pattern: str) -> int:
        """Download into ``staged`` the files matching ``pattern`` (a glob relative to an attempt) that
        any attempt of the entry holds and ``staged`` lacks, newest attempt first; how many. A stage that
        repairs in place then validates and keeps what it can (the relevance job: committed groups)."""
        fs = filesystem(self.url)
        base = f"{self.entry(stage, fingerprint)}/{ATTEMPTS}"
        fetched = 0
        for attempt, _ in sorted(self._attempts(base), key=lambda a: a[1], reverse=True):
            prefix = _bare(f"{base}/{attempt}")
            for remote in fs.glob(f"{prefix}/{pattern}"):
                local = staged / remote[len(prefix) + 1 :]
                if not local.exists():
                    local.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(remote, str(local))
                    fetched += 1
        return fetched

    def _attempts(self, base: str) -> Iterator[tuple[str, float]]:
        """Each attempt under ``base`` with the time of its newest object."""
        newest: dict[str, float] = {}
        for name, info in _listing(base).items():
            attempt = name.split("/", 1)[0]
            newest[attempt] = max(newest.get(attempt, 0.0), _mtime(info))
        yield from newest.items()

    def _collect_superseded(self, entry: str, *, keep: str) -> None:
        fs = filesystem(self.url)
        base = f"{entry}/{ATTEMPTS}"
        for attempt, mtime in list(self._attempts(base)):
            if f"{base}/{attempt}" != keep and time.time() - mtime > GRACE_S:
                fs.rm(f"{base}/{attempt}", recursive=True)
                log.info(f"[cache] deleted the superseded attempt {base}/{attempt}")


class Claim:
    """A held claim on a cache entry (:meth:`BucketCache.claim`): renewed in the background while held,
    marked released on exit. :meth:`check` before committing: the claim must still be this driver's."""

    def __init__(self, path: str, holder: str, lock: str | None = None) -> None:
        self.path, self.holder, self.lock, self.token = path, holder, lock, uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewed = time.monotonic()
        self._thread: threading.Thread | None = None

    def payload(self, *, released: bool = False) -> bytes:
        me = {"holder": self.holder, **host_identity(), "lock": self.lock, "pid": os.getpid(), "token": self.token}
        return json.dumps({**me, "released": released}).encode()

    def release(self) -> None:
        """Mark the claim released (unless another driver took it over): free at once for the next."""
        try:
            if not self.superseded():
                filesystem(self.path).pipe_file(self.path, self.payload(released=True))
        except OSError as err:  # the claim then expires by itself
            log.warning(f"[cache] could not release {self.path} ({err}); it expires in {CLAIM_TTL_S:.0f} s")

    def __enter__(self) -> Claim:
        self._thread = threading.Thread(target=self._renew, name="zoomvit-claim", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()

    def superseded(self) -> bool:
        """Whether another driver holds a later claim on the entry (it took this one over)."""
        base, name = self.path.rsplit("/", 1)
        return max(_claims(base), default=0) > int(name.split(".")[0])

    def check(self) -> None:
        """Raise :class:`OSError` when this claim may no longer be this driver's: another took it over,
        or it could not be renewed for most of its lifetime (a storage outage)."""
        if self.superseded():
            raise OSError(f"{self.path}: another driver took over this claim; this run's result is not committed")
        if (stale := time.monotonic() - self._renewed) > 0.75 * CLAIM_TTL_S:
            raise OSError(f"{self.path}: not renewed for {stale:.0f} s; another driver may have taken it over")

    def _renew(self) -> None:
        fs = filesystem(self.path)
        while not self._stop.wait(CLAIM_TTL_S / 4):
            try:
                if self.superseded():
                    log.warning(f"[cache] {self.path}: taken over by another driver")
                    return
                fs.pipe_file(self.path, self.payload())
                self._renewed = time.monotonic()
            except OSError as err:
                log.warning(f"[cache] could not renew {self.path} ({err}); retrying")


def host_identity() -> dict[str, str]:
    """This machine as a claim names it: the hostname, the kernel's boot id and a token kept in this
    home (:func:`default_dir`), so two containers that share a hostname and a home path but not the
    home's files are two machines."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    token_file = default_dir() / "staging" / ".host-token"
    try:
        token = token_file.read_text().strip()
    except FileNotFoundError:
        token_file.parent.mkdir(parents=True, exist_ok=True)
        mine = token_file.with_name(f".host-token.{uuid.uuid4().hex}")
        mine.write_text(uuid.uuid4().hex)
        with contextlib.suppress(FileExistsError):
            os.link(mine, token_file)  # the first writer's token stands
        mine.unlink()
        token = token_file.read_text().strip()
    return {"host": socket.gethostname(), "boot_id": boot, "home_token": token}


def _left_by_a_dead_driver_here(state: dict[str, Any], held_lock: str) -> bool:
    """A claim made on this machine under the staging lock this driver now holds exclusively: its
    holder is gone (its process too, where it is this machine's), so the claim is free at once."""
    here = host_identity()
    if any(state.get(key) != value for key, value in here.items()) or state.get("lock") != held_lock:
        return False
    pid = state.get("pid")
    return not isinstance(pid, int) or pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claims(base: str) -> dict[int, dict[str, Any]]:
    """The claim objects under ``base`` by number."""
    return {int(name.split(".")[0]): info for name, info in _listing(base).items() if name.endswith(".json")}


def _claim_state(fs, path: str, info: dict[str, Any]) -> dict[str, Any]:
    """A claim's content, and whether it is free: released, or not renewed within :data:`CLAIM_TTL_S`."""
    try:
        state = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        state = {}
    expired = time.time() - _mtime(info) > CLAIM_TTL_S
    return {**state, "free": bool(state.get("released")) or expired}


def remove_staged(staged: Path) -> None:
    """A published output's staging copy: the bucket holds it now."""
    shutil.rmtree(staged, ignore_errors=True)


def _objects(manifest: dict[str, Any]) -> Iterator[tuple[str, str | None, str, Any, Any]]:
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


def _etags(manifest: dict[str, Any], listing: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``object_etags`` record of a manifest's objects, shaped as its ``file_sizes``."""
    out: dict[str, Any] = {}
    for key, inner, name, _, _ in _objects(manifest):
        etag = _etag(listing.get(name, {}))
        if inner is None:
            out[key] = etag
        else:
            out.setdefault(key, {})[inner] = etag
    return out


def _bare(url: str) -> str:
    from fsspec.core import strip_protocol

    return strip_protocol(url).rstrip("/")


def _listing(prefix: str) -> dict[str, dict[str, Any]]:
    """Every object under ``prefix`` by its path relative to it, from one recursive listing."""
    assert is_url(prefix), prefix
    fs = filesystem(prefix)
    base = _bare(prefix)
    fs.invalidate_cache(base)  # ask the store, not fsspec's listing cache: another run may have written since
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    return {path[len(base) + 1 :]: info for path, info in found.items() if path.startswith(base + "/")}


def _etag(info: dict[str, Any]) -> str | None:
    """The store's identity of an object's content: S3's ETag, GCS's md5Hash or generation."""
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("LastModified") or info.get("updated") or info.get("mtime")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value or 0.0)
