"""The one interface every stage cache offers the runner, and what a writer hands the stage it computes.

A run reads as plan, then for each stage ``acquire`` (the committed output under a read hold, or a
:class:`Writer` holding the right to compute it), compute into ``writer.out_dir``, ``writer.commit``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from zoomvit.checkpoints import Checkpoints
from zoomvit.data.shards import filesystem, is_url, local_path

Manifest = dict[str, Any]


class Step(Protocol):
    """What a cache reads of a planned stage (:class:`~zoomvit.pipeline.plan.PlannedStage`)."""

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def out_dir(self) -> Path: ...  # where it computes on this machine

    @property
    def action(self) -> Literal["run", "cached", "missing"]: ...

    @property
    def manifest(self) -> Manifest | None: ...  # the cached output's, when ``action`` is ``cached``


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
        self, step: Step, *, forced: bool, holder: str, holds: ExitStack
    ) -> tuple[Manifest | None, Writer | None]:
        """``(manifest, None)``: the committed output, read-held until ``holds`` closes; or ``(None,
        writer)``: this run computes it (it waited for any other run computing it)."""
        ...

    def keep(self, paths: list[Path]) -> None:
        """Copy run records (the lineage) beside the entries, where the store is shared."""
        ...

    def describe(self) -> str: ...


def checkpoint_base(root: str | None, stage: str, fingerprint: str) -> str | None:
    """``<root>/<stage>/<fingerprint>``: where a stage's training checkpoints go when ``checkpoint_root``
    moves them out of its output; None without one."""
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
