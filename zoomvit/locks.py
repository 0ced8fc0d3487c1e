"""Locks that let concurrent runs share outputs: ``flock`` on a ``<path>.lock`` file, shared by the runs
reading what ``path`` holds, exclusive for the one run writing or deleting it. The kernel releases a
lock when its holder dies; it works across processes on one host and on NFSv4.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class OutputLock:
    """``flock`` on ``<path>.lock``: many runs reading what ``path`` holds (shared) or one run writing or
    deleting it (exclusive). The kernel releases it when its holder dies; it works across processes on
    one host and on NFSv4. Blocking acquisitions say, once, for whom they wait."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(f"{path}.lock")
        self.what = what
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # held across calls; closed by release()

    def shared(self) -> None:
        self._flock(fcntl.LOCK_SH, "to finish writing it")

    def exclusive(self) -> None:
        """Waits for every reader and writer. A shared hold of this object is dropped first (converting
        in place could deadlock with another reader doing the same)."""
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._flock(fcntl.LOCK_EX, "to finish with it")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def share(self) -> None:
        """Exclusive -> shared without letting a waiting writer in between (Linux converts under one
        spinlock; a waiter re-checks and finds the shared hold)."""
        fcntl.flock(self._file, fcntl.LOCK_SH)

    def try_exclusive(self) -> bool:
        """Take it exclusively if nobody holds it, without waiting."""
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def _flock(self, mode: int, purpose: str) -> None:
        try:
            fcntl.flock(self._file, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip()
            log.info(f"{self.what}: waiting for another run {purpose}" + (f" (last writer {holder})" if holder else ""))
            fcntl.flock(self._file, mode)


@contextmanager
def exclusive(path: str | os.PathLike[str], what: str) -> Iterator[OutputLock]:
    """Hold ``path``'s :class:`OutputLock` exclusively for the block."""
    with OutputLock(path, what) as lock:
        lock.exclusive()
        yield lock


def read_or_claim(lock: OutputLock, ready: Callable[[], T | None], *, claim: bool = False) -> T | None:
    """What ``ready()`` finds under a shared hold of ``lock`` (another run may be writing it: wait for
    that), or None with ``lock`` held exclusively for the caller to write, then :meth:`OutputLock.share`.
    ``claim``: take it exclusively whatever is there (a forced recompute; waits for every reader)."""
    if not claim:
        lock.shared()
        if (found := ready()) is not None:
            return found
    lock.exclusive()
    if not claim and (found := ready()) is not None:  # written while this run waited
        lock.share()
        return found
    return None
