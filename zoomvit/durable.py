"""Writing files so that a crash, a power loss or a concurrent writer never leaves a partial one.

Every write goes to a temporary name unique to this process and call, is fsynced, renamed over
the target and the directory fsynced: a reader sees the old file or the whole new one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


@contextmanager
def exclusive(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``flock``: released by the kernel when the holder dies,
    works across processes on one host and on NFSv4). Waits, saying for whom, when another holds it."""
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            log.info(f"{what}: waiting for {f.read().strip() or 'another run'}")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
