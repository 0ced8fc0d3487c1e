"""The pipeline process: starting or joining Ray the same way from a script, ``ray job submit`` and
tests; SIGTERM turned into an exception that unwinds the run."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from zoomvit.logs import verbose


def init_ray(*, num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``) or a local head; else start one."""
    import ray

    if ray.is_initialized():
        return
    if not verbose():  # a local cluster's workers inherit it: Ray Data's per-dataset INFO lines stay in its logs
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    try:
        ray.init(address="auto")
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1")  # Ray Train's cleaner needs the state API


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``ray job stop``, a scheduler's preemption): unwind, ending every open run as KILLED.
    A ``KeyboardInterrupt`` because a blocking Ray call gives way only to that (it then raises a plain
    ``KeyboardInterrupt``: :func:`terminated` tells the two apart)."""


_terminated = threading.Event()


def terminated() -> bool:
    """Whether SIGTERM arrived while :func:`sigterm_unwinds` was active."""
    return _terminated.is_set()


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread while the block runs, so ``finally`` and
    ``except`` clauses (which end MLflow runs) run before the process exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _terminated.set()
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
