"""Where a process keeps what must outlast it by default (the stage cache, the tracking store, staging):
the working directory, except inside the per-job copy that ``ray job submit --working-dir`` makes."""

from __future__ import annotations

import os
from pathlib import Path


def in_job_working_dir() -> bool:
    """Whether this process runs in Ray's per-job copy of ``ray job submit --working-dir``, which Ray
    deletes after the job: nothing meant to last may default to a path inside it."""
    return "runtime_resources" in Path.cwd().resolve().parts


def default_dir() -> Path:
    """Where defaults go: the working directory, or ``$ZOOMVIT_HOME`` (``~/.zoomvit``) inside a Ray job."""
    if in_job_working_dir():
        return Path(os.environ.get("ZOOMVIT_HOME") or "~/.zoomvit").expanduser().resolve()
    return Path.cwd().resolve()
