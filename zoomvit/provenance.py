"""Which code a run ran: the git commit of the checkout, and whether its tree had uncommitted changes.

A local run reads it from the checkout the package is imported from. ``ray job submit --working-dir .``
copies the working directory without ``.git``, so the submitting side passes it along in the job's
runtime env (``zoomvit runtime-env`` prints one: ``ZOOMVIT_GIT_COMMIT``, ``ZOOMVIT_GIT_DIRTY``), and those
win over the copy. Code that runs from neither records ``none`` and says why. No MLflow or Ray here.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

COMMIT_ENV = "ZOOMVIT_GIT_COMMIT"
DIRTY_ENV = "ZOOMVIT_GIT_DIRTY"
NO_GIT = "none"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Source:
    """``commit``: the full hash, or None where no git tells it; ``dirty``: tracked files differed from it
    (None: not known); ``origin``: ``checkout`` (read here), ``submitter`` (handed over by whoever
    submitted the job) or ``none``; ``note``: a sentence for a human where the commit is not known."""

    commit: str | None
    dirty: bool | None
    origin: str
    note: str = ""

    def tags(self) -> dict[str, str]:
        """The parent run's tags: ``git_commit`` (the hash, or ``none``), ``git_dirty``, ``git_source``,
        and MLflow's own source-version tag where the commit is known (the UI's Version column)."""
        if self.commit is None:
            return {"git_commit": NO_GIT, "git_source": self.note}
        tags = {"git_commit": self.commit, "git_source": self.origin, "mlflow.source.git.commit": self.commit}
        if self.dirty is not None:
            tags["git_dirty"] = str(self.dirty).lower()
        return tags


def _git(path: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=path, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def checkout_source(path: str | Path = PACKAGE_DIR) -> Source | None:
    """The commit of the git checkout holding ``path`` (a directory of tracked files: a package
    installed into a virtual environment that happens to sit inside some repository is not its
    code), and whether tracked files differ from it; None where git does not know ``path``."""
    path = Path(path)
    try:
        commit = _git(path, "rev-parse", "--verify", "HEAD")
        if path == PACKAGE_DIR:  # the package's own files must be what the commit holds
            _git(path, "ls-files", "--error-unmatch", "--", "__init__.py")
        dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return Source(commit, dirty, "checkout")


def resolve_source(environ: Mapping[str, str] = os.environ, path: str | Path = PACKAGE_DIR) -> Source:
    """What a run records: the submitter's commit from ``environ`` when it is there, else the checkout's
    at ``path``, else ``none`` with the reason."""
    given = environ.get(COMMIT_ENV, "").strip()
    if given and given != NO_GIT:
        flag = environ.get(DIRTY_ENV, "").strip().lower()
        dirty = {"true": True, "1": True, "false": False, "0": False}.get(flag)
        return Source(given, dirty, "submitter")
    if found := checkout_source(path):
        return found
    if given == NO_GIT:
        note = "no git: the submitting tree is not a git checkout"
    else:
        note = (
            "no git: the code ran from a tree without .git (a `ray job submit --working-dir` copy travels "
            'without it; submit with --runtime-env-json "$(zoomvit runtime-env)" to record the commit)'
        )
    return Source(None, None, NO_GIT, note)


def submit_env(path: str | Path = ".") -> dict[str, str]:
    """The env vars that carry the checkout at ``path`` into a submitted job (``NO_GIT`` where it has no git)."""
    found = checkout_source(path)
    if found is None:
        return {COMMIT_ENV: NO_GIT}
    return {COMMIT_ENV: found.commit or NO_GIT, DIRTY_ENV: str(found.dirty).lower()}
