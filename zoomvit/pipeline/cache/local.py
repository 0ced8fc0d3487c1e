"""The stage cache in a directory: an entry per stage and fingerprint, committed by writing its manifest
last and durably under the entry's exclusive file lock; readers hold it shared until their run ends,
so a forced recompute waits for them. This machine's half of the object-store cache too: its staging
directories are locked the same way."""

from __future__ import annotations

import logging
import shutil
from contextlib import ExitStack
from pathlib import Path

from zoomvit.checkpoints import Checkpoints
from zoomvit.durable import remove_stale_temporaries, write_json_durably
from zoomvit.errors import UserError
from zoomvit.locks import OutputLock, read_or_claim
from zoomvit.pipeline.cache.committed import MANIFEST, committed_output, location_of
from zoomvit.pipeline.cache.interface import Manifest, StageIO, Step, checkpoint_base, remove_tree

log = logging.getLogger(__name__)


def hold_here(step: Step, own: Path | str, *, forced: bool, holds: ExitStack) -> tuple[Manifest | None, OutputLock]:
    """This machine's lock on the step's output (its directory, or its staging directory), and the
    committed output found under a shared hold; None with the lock held exclusively to compute it."""
    source = location_of(step.manifest["out_dir"]) if step.action == "cached" else own  # --from-run: elsewhere
    where = source if isinstance(source, Path) else step.out_dir
    lock = holds.enter_context(OutputLock(where, f"[{step.name}] {where}"))

    manifest = read_or_claim(lock, lambda: committed_output(source, step.fingerprint)[0], claim=forced)
    if manifest is not None and step.action == "run":
        log.info(f"[{step.name}] computed by run {manifest['run_id']} while this run waited")
    elif manifest is None and step.action == "cached":
        if source != own:
            raise UserError(f"stage {step.name!r}: the output of run {step.manifest['run_id']} at {where} "
                            "changed or vanished since this run was planned; run again")  # fmt: skip
        log.info(f"[{step.name}] its cached output changed since this run was planned; computing it")
    return manifest, lock


def prepare_staging(out_dir: Path, name: str, *, wipe: bool, checkpoints: str | None) -> None:
    """A staging directory to compute into: emptied (and the checkpoints removed) when ``wipe``, else
    kept to resume from, minus the temporaries a killed writer left."""
    if wipe:  # forced or --only: recompute, never resume a finished output
        shutil.rmtree(out_dir, ignore_errors=True)
        if checkpoints is not None:
            remove_tree(checkpoints)
    out_dir.mkdir(parents=True, exist_ok=True)
    if stale := remove_stale_temporaries(out_dir):
        log.info(f"[{name}] removed {stale} temporary file(s) a killed run left in {out_dir}")


class LocalCache:
    def __init__(self, root: Path, checkpoint_root: str | None) -> None:
        self.root, self.checkpoint_root = root, checkpoint_root

    def location(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint[:16]

    def acquire(
        self, step: Step, *, forced: bool, holder: str, holds: ExitStack
    ) -> tuple[Manifest | None, LocalWriter | None]:
        manifest, lock = hold_here(step, step.out_dir, forced=forced, holds=holds)
        if manifest is not None:
            return manifest, None
        return None, LocalWriter(step, lock, checkpoint_base(self.checkpoint_root, step.name, step.fingerprint))

    def keep(self, paths: list[Path]) -> None:
        pass  # the lineage is written under root already

    def describe(self) -> str:
        return str(self.root)


class LocalWriter:
    def __init__(self, step: Step, lock: OutputLock, checkpoints: str | None) -> None:
        self.step, self.lock, self.out_dir, self.checkpoints = step, lock, step.out_dir, checkpoints

    def begin(self, run_id: str, *, recompute: bool, repairs_in_place: bool, parts: str | None) -> StageIO:
        manifest, damaged = committed_output(self.out_dir)
        committed_before = manifest is not None or damaged is not None
        wipe = committed_before and (recompute or not repairs_in_place)
        if committed_before and not wipe:
            (self.out_dir / MANIFEST).unlink()  # damaged: the stage recomputes only its damaged parts
        prepare_staging(self.out_dir, self.step.name, wipe=wipe, checkpoints=self.checkpoints)
        return StageIO(str(self.out_dir), Checkpoints(self.checkpoints) if self.checkpoints else None)

    def commit(self, manifest: Manifest) -> Manifest:
        write_json_durably(self.out_dir / MANIFEST, manifest)
        self.lock.share()  # committed: readable by other runs, deletable by none while this one runs
        return manifest
