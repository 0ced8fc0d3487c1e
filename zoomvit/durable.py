"""Writing files so that a crash, a power loss or a concurrent writer never leaves a partial one.

Every write goes to a temporary name unique to this process and call, is fsynced, renamed over
the target and the directory fsynced: a reader sees the old file or the whole new one.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` no other process or call will pick."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


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
