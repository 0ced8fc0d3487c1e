"""The stage cache in object storage as the runner sees it: this machine's staging lock, then the
bucket's claim (computing) or read lease (a hit); a writer that stages, resumes from earlier attempts
and epochs, checks its fence before every write that outlives it, and publishes (:mod:`.bucket`)."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from zoomvit.checkpoints import Checkpoints
from zoomvit.data.shards import is_url
from zoomvit.locks import OutputLock
from zoomvit.pipeline.cache.bucket import CHECKPOINTS, BucketCache, remove_staged
from zoomvit.pipeline.cache.claims import Claim
from zoomvit.pipeline.cache.committed import committed_output
from zoomvit.pipeline.cache.interface import Manifest, StageIO, Step, checkpoint_base
from zoomvit.pipeline.cache.local import hold_here, prepare_staging

log = logging.getLogger(__name__)


class ObjectStoreCache:
    def __init__(self, root: Path, checkpoint_root: str | None, bucket: BucketCache) -> None:
        self.root, self.checkpoint_root, self.bucket = root, checkpoint_root, bucket

    def location(self, stage: str, fingerprint: str) -> str:
        return self.bucket.entry(stage, fingerprint)

    def acquire(
        self, step: Step, *, forced: bool, holder: str, holds: ExitStack
    ) -> tuple[Manifest | None, ObjectStoreWriter | None]:
        own = self.bucket.entry(step.name, step.fingerprint)
        manifest, lock = hold_here(step, own, forced=forced, holds=holds)
        if manifest is None:  # other machines: the bucket's claim, as the lock here
            committed = None if forced else lambda: committed_output(own, step.fingerprint)[0]
            manifest, claim = self.bucket.claim(
                step.name, step.fingerprint, holder, committed, held_lock=str(lock.path)
            )
            if claim is not None:
                holds.enter_context(claim)
                base = checkpoint_base(self.checkpoint_root, step.name, step.fingerprint) or f"{own}/{CHECKPOINTS}"
                return None, ObjectStoreWriter(self.bucket, step, lock, claim, base, holder, holds)
            log.info(f"[{step.name}] computed by run {manifest['run_id']} elsewhere while this run waited")
        if is_url(manifest["out_dir"]):
            holds.enter_context(self.bucket.lease(manifest, holder))
        return manifest, None

    def keep(self, paths: list[Path]) -> None:
        self.bucket.upload(self.root, paths, self.bucket.url)

    def describe(self) -> str:
        return f"{self.bucket.url} (staged in {self.root})"


class ObjectStoreWriter:
    def __init__(
        self,
        bucket: BucketCache,
        step: Step,
        lock: OutputLock,
        claim: Claim,
        checkpoints: str,
        holder: str,
        holds: ExitStack,
    ) -> None:
        self.bucket, self.step, self.lock, self.claim = bucket, step, lock, claim
        self.out_dir, self.checkpoints, self.holder, self.holds = step.out_dir, checkpoints, holder, holds
        self.committed_before = False

    def begin(self, run_id: str, *, recompute: bool, repairs_in_place: bool, parts: str | None) -> StageIO:
        name, fp = self.step.name, self.step.fingerprint
        manifest, damaged = committed_output(self.bucket.entry(name, fp))
        self.committed_before = manifest is not None or damaged is not None  # intact or not: replaced
        wipe = self.committed_before and (recompute or not repairs_in_place)
        prepare_staging(self.out_dir, name, wipe=wipe, checkpoints=self.checkpoints)
        attempt = self.bucket.attempt(name, fp, run_id)
        on_part = None
        if parts:
            if not wipe and (fetched := self.bucket.seed(name, fp, self.out_dir, parts)):
                log.info(f"[{name}] resuming from {fetched} file(s) of earlier attempts in {self.bucket.url}")

            def on_part(files: list[Path]) -> None:
                self.claim.check()
                self.bucket.upload(self.out_dir, files, attempt)

        location = self.bucket.checkpoints(self.checkpoints, self.claim.epoch, resume=not wipe)
        return StageIO(attempt, Checkpoints(location, self.claim.fence), on_part)

    def commit(self, manifest: Manifest) -> Manifest:
        self.claim.check()
        standing = self.bucket.publish(self.out_dir, manifest, replace=self.committed_before)
        remove_staged(self.out_dir)
        self.holds.enter_context(self.bucket.lease(standing, self.holder))
        self.lock.share()
        return standing
