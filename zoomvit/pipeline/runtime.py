"""Starting or joining Ray the same way from a script, ``ray job submit`` and tests."""

from __future__ import annotations

import os

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
