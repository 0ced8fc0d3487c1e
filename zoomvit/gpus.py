"""Whether work runs on GPUs: ``use_gpu: auto`` resolved against the Ray cluster the process joined."""

from __future__ import annotations

from pathlib import Path

from zoomvit.cluster_config import load_cluster_yaml

LAUNCHER_BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the config on the head


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """``auto``: GPUs when the cluster has some now or its autoscaler can add a node type that has them
    (GPU node types scaling from 0 must still be asked for); False outside Ray. The node types come
    from what autoscaler v2 (KubeRay) reports to the GCS, else from the cluster launcher's config on
    the head, where a `ray job submit` driver runs."""
    import ray

    if use_gpu != "auto":
        return bool(use_gpu)
    if not ray.is_initialized():
        return False
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    from ray._private.state import state

    most = state.get_max_resources_from_cluster_config() or {}
    if most.get("GPU", 0) > 0:
        return True
    bootstrap = Path(LAUNCHER_BOOTSTRAP).expanduser()
    if not bootstrap.is_file():
        return False
    node_types = (load_cluster_yaml(bootstrap).get("available_node_types") or {}).values()
    return any(t.get("resources", {}).get("GPU", 0) > 0 and t.get("max_workers", 0) > 0 for t in node_types)
