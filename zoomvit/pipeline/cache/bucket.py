"""The stage cache in object storage (``artifact_root: s3://...``, ``gs://...``, any fsspec URL).

A bucket has neither locks nor renames, so an entry commits differently from a local one. A driver
that is to compute an output first claims it (:class:`~zoomvit.pipeline.cache.claims.Claim`): it
creates the next numbered claim object with an exclusive write (``If-None-Match: *``; GCS: generation
0; checked once per store by :func:`~zoomvit.pipeline.cache.store.require_exclusive_creates`) and
renews it while it works. Another driver waits while that claim is alive, takes the output once it is
committed, or takes over a claim whose holder stopped renewing it (after ``CLAIM_TTL_S``) by creating
the next number. The number is the holder's epoch: its checkpoints go under ``ray/<epoch>/`` (a
resume copies the previous epoch's), its parts under its own attempt, and its workers, part uploads
and commit check the fence first, so a holder that was taken over fails instead of writing into the
new holder's output. The holder computes into a local staging directory, uploads its files under
``attempts/<stage run id>``, then writes the entry's manifest, naming that prefix, last, again with
an exclusive write unless it replaces a damaged or forced entry.

Every run that reads an attempt (a hit, or its own commit, for the rest of the run) holds a renewed
read lease on it. A forced commit records when it superseded the attempt before; a commit deletes a
superseded attempt only when no lease on it is live and :data:`GRACE_S` has passed since then. A hit
is checked from one listing, reading no content: every listed object is there, with the size and the
ETag it had when it was uploaded. Claims and leases expire by the store's clock (LastModified)
against the driver's: clocks must agree to well within the TTLs.

    <root>/<stage>/<fingerprint[:16]>/manifest.json
    <root>/<stage>/<fingerprint[:16]>/claims/<epoch>.json           who computes it (the highest epoch)
    <root>/<stage>/<fingerprint[:16]>/attempts/<run id>/...         one computation's files
    <root>/<stage>/<fingerprint[:16]>/leases/<id>.json              a run reading an attempt
    <root>/<stage>/<fingerprint[:16]>/superseded/<run id>.json      when a forced commit replaced that attempt
    <root>/<stage>/<fingerprint[:16]>/ray/<epoch>/...               Ray Train's checkpoints of that epoch
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoomvit.data.shards import filesystem
from zoomvit.home import default_dir
from zoomvit.pipeline.cache.claims import Claim, Lease, claim_state, claims, left_by_a_dead_driver_here, live_leases
from zoomvit.pipeline.cache.committed import MANIFEST, committed_output, written_manifest
from zoomvit.pipeline.cache.store import (
    ATTEMPTS,
    bare,
    damage,
    etags,
    list_objects,
    mtime_of,
    objects,
    require_exclusive_creates,
    upload_file,
)

log = logging.getLogger(__name__)

CLAIMS, LEASES, SUPERSEDED, CHECKPOINTS = "claims", "leases", "superseded", "ray"
GRACE_S = 24 * 3600.0  # a superseded attempt outlives its supersession (and its last reader) by this much
POLL_S = 5.0  # how often a waiting driver looks again


def staging_root(url: str) -> Path:
    """Where a bucket root's stages compute, lock and keep their per-driver records on this machine."""
    return default_dir() / "staging" / url.replace("://", "/", 1).rstrip("/")


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
        require_exclusive_creates(self.url)
        fs, base = filesystem(self.url), f"{self.entry(stage, fingerprint)}/{CLAIMS}"
        said = False
        while True:
            if committed is not None and (done := committed()) is not None:
                return done, None
            numbered = claims(base)
            current = max(numbered, default=0)
            state = claim_state(f"{base}/{current:08d}.json", numbered[current]) if current else None
            if state is not None and held_lock and left_by_a_dead_driver_here(state, held_lock):
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

    def lease(self, manifest: dict[str, Any], holder: str) -> Lease:
        """A read lease on a committed manifest's attempt, to hold (``with``) while the run reads it."""
        entry, _, attempt = manifest["out_dir"].rstrip("/").rpartition(f"/{ATTEMPTS}/")
        return Lease(f"{entry}/{LEASES}", attempt, holder)

    def upload(self, staged: Path, files: list[Path], attempt: str) -> None:
        """Put staged files (paths under ``staged``) under ``attempt``, keeping their relative paths."""
        for path in files:
            upload_file(str(path), f"{attempt}/{path.relative_to(staged).as_posix()}")

    def publish(self, staged: Path, manifest: dict[str, Any], *, replace: bool) -> dict[str, Any]:
        """Upload a stage's staged output and commit it (module docstring). Returns the manifest that
        stands: this one, or the one another run committed first (its own upload is then deleted).
        ``replace``: overwrite a committed manifest (forced, or the entry was damaged)."""
        require_exclusive_creates(self.url)
        fs = filesystem(self.url)
        stage, fp = manifest["stage"], manifest["fingerprint"]
        entry, attempt = self.entry(stage, fp), self.attempt(stage, fp, manifest["run_id"])
        committed = {**manifest, "out_dir": attempt}
        present = list_objects(attempt)  # the parts this run uploaded as it committed them (StageContext.on_part)
        missing = [name for _, _, name, size, _ in objects(committed) if present.get(name, {}).get("size") != size]
        self.upload(staged, [staged / name for name in missing], attempt)
        listing = list_objects(attempt)
        committed["object_etags"] = etags(committed, listing)
        if why := damage(committed, listing):  # the store holds something else than what was staged
            raise OSError(f"stage {stage!r}: the upload to {attempt} is incomplete: {why}")
        previous, _ = written_manifest(entry) if replace else (None, None)
        payload = json.dumps(committed, indent=2, default=str).encode()
        try:
            fs.pipe_file(f"{entry}/{MANIFEST}", payload, mode="overwrite" if replace else "create")
        except FileExistsError:
            winner, _ = committed_output(entry)
            if winner is not None and winner.get("out_dir") == attempt and winner.get("run_id") == manifest["run_id"]:
                log.info(f"[{stage}] the manifest put was retried after it landed; it names this attempt")
                self._collect_superseded(entry, keep=attempt)
                return winner
            fs.rm(attempt, recursive=True)
            if winner is None:  # committed, then damaged or removed since: this run's copy is as good
                return self.publish(staged, manifest, replace=True)
            log.info(f"[{stage}] run {winner['run_id']} committed this output first; this run's copy is discarded")
            return winner
        if previous is not None and previous.get("out_dir") not in (None, attempt):
            self._record_supersession(entry, previous["out_dir"].rstrip("/").rsplit("/", 1)[-1], manifest["run_id"])
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
            prefix = bare(f"{base}/{attempt}")
            for remote in fs.glob(f"{prefix}/{pattern}"):
                local = staged / remote[len(prefix) + 1 :]
                if not local.exists():
                    local.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(remote, str(local))
                    fetched += 1
        return fetched

    def checkpoints(self, base: str, epoch: int, *, resume: bool) -> str:
        """The epoch's own checkpoint prefix under ``base``; with ``resume``, first a copy of the latest
        earlier epoch's checkpoints there (read, never shared: a late write of that epoch stays in it)."""
        fs, mine = filesystem(base), f"{base}/{epoch:08d}"
        if resume:
            earlier = sorted(int(e) for e in {n.split("/", 1)[0] for n in list_objects(base)} if e.isdigit())
            earlier = [e for e in earlier if e < epoch]
            if earlier and not list_objects(mine):
                source = f"{base}/{earlier[-1]:08d}"
                for name in list_objects(source):
                    fs.copy(f"{source}/{name}", f"{mine}/{name}")
                log.info(f"[cache] resuming from the checkpoints of epoch {earlier[-1]} (copied to {mine})")
        return mine

    def _attempts(self, base: str) -> Iterator[tuple[str, float]]:
        """Each attempt under ``base`` with the time of its newest object."""
        newest: dict[str, float] = {}
        for name, info in list_objects(base).items():
            attempt = name.split("/", 1)[0]
            newest[attempt] = max(newest.get(attempt, 0.0), mtime_of(info))
        yield from newest.items()

    def _record_supersession(self, entry: str, attempt: str, by: str) -> None:
        readers = live_leases(f"{entry}/{LEASES}").get(attempt, [])
        record = json.dumps({"at": time.time(), "by": by}).encode()
        try:
            filesystem(self.url).pipe_file(f"{entry}/{SUPERSEDED}/{attempt}.json", record, mode="create")
        except FileExistsError:
            pass  # superseded before: the first time stands
        if readers:
            log.warning(
                f"[cache] the superseded attempt {entry}/{ATTEMPTS}/{attempt} has {len(readers)} live reader(s) "
                f"({'; '.join(readers)}): it is kept until their leases end and {GRACE_S:.0f} s have passed"
            )

    def _collect_superseded(self, entry: str, *, keep: str) -> None:
        """Delete the attempts other than ``keep`` that no live lease reads and whose grace has passed:
        counted from the recorded supersession, or, for one never committed, from its newest object."""
        fs = filesystem(self.url)
        base = f"{entry}/{ATTEMPTS}"
        read = live_leases(f"{entry}/{LEASES}")
        recorded = {n.removesuffix(".json"): n for n in list_objects(f"{entry}/{SUPERSEDED}")}
        for attempt, newest in list(self._attempts(base)):
            if f"{base}/{attempt}" == keep or attempt in read:
                continue
            since = newest
            if attempt in recorded:
                try:
                    since = json.loads(fs.cat_file(f"{entry}/{SUPERSEDED}/{recorded[attempt]}"))["at"]
                except (OSError, ValueError, KeyError):
                    pass
            if time.time() - since > GRACE_S:
                fs.rm(f"{base}/{attempt}", recursive=True)
                if attempt in recorded:
                    fs.rm(f"{entry}/{SUPERSEDED}/{recorded[attempt]}")
                log.info(f"[cache] deleted the superseded attempt {base}/{attempt}")


def remove_staged(staged: Path) -> None:
    """A published output's staging copy: the bucket holds it now."""
    shutil.rmtree(staged, ignore_errors=True)
