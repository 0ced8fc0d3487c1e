"""The pipeline process: starting or joining Ray the same way from a script, ``ray job submit`` and
tests; SIGTERM turned into an exception that unwinds the run."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from zoomvit.logs import verbose


def init_ray(*, num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``) or a local head; else start one.
    ``RAY_ADDRESS=local`` starts one even where a cluster runs (Ray's own meaning of ``local``): how the
    tests keep their drivers off a Ray they did not start."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = quiet_workers_env()
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=with_cluster_address(runtime_env, address))
        return
    if not address:
        try:
            ray.init(address="auto", runtime_env=runtime_env)
            return
        except (ConnectionError, RuntimeError, ValueError):
            pass
    # Ray Train's placement-group cleaner needs the state API, hence the dashboard
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", runtime_env=runtime_env)


QUIET_WORKERS = {
    "RAY_DATA_LOG_LEVEL": "WARNING",  # per-dataset "Starting execution" lines of split coordinators and tasks
    "PYTHONWARNINGS": "ignore::DeprecationWarning",  # Ray's own deprecations inside its actors
}


def quiet_workers_env() -> dict[str, dict[str, str]] | None:
    """What every worker process of this job gets unless ``--verbose``: env vars that keep library
    chatter in Ray's log files. Keys the submitted job's own runtime env sets are left to it (Ray
    refuses to merge a driver's env var with the job's)."""
    if verbose():
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    return {"env_vars": {k: os.environ.get(k, v) for k, v in QUIET_WORKERS.items() if k not in taken}}


def with_cluster_address(runtime_env: dict | None, address: str) -> dict | None:
    """``runtime_env`` with ``RAY_ADDRESS`` for every worker when the driver joined a cluster by its GCS
    address: Ray Train's placement-group cleaner (an actor) finds its cluster by auto-detection, which
    fails where another Ray runs on the machine (a user's own). Left to the job's runtime env if it
    sets it; nothing for ``auto`` or a ``ray://`` client address."""
    if address == "auto" or "://" in address:
        return runtime_env
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return runtime_env
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), "RAY_ADDRESS": address}
    return env


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
