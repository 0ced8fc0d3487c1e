"""Writing files so that a crash, a power loss or a concurrent writer never leaves a partial one.

Every write goes to a temporary name unique to this process and call, is fsynced, renamed over
the target and the directory fsynced: a reader sees the old file or the whole new one. Runs that
share a directory coordinate through :class:`~zoomvit.locks.OutputLock` (readers shared, a writer
exclusive).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` no other process or call will pick."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete the temporaries (:func:`temporary_name`) under ``directory`` that a killed writer left; how
    many. Only for a caller holding the directory's :class:`~zoomvit.locks.OutputLock` exclusively: no
    live writer then."""
    stale = [p for p in Path(directory).rglob(".*.tmp") if _TEMPORARY.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_durably(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the content to ``tmp``; it then becomes ``path`` atomically and durably."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: str | os.PathLike[str], payload: Any, **dumps: Any) -> None:
    text = json.dumps(payload, **{"indent": 2, "default": str, **dumps})
    write_durably(path, lambda tmp: tmp.write_text(text))
