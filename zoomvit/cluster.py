"""Ray cluster-launcher configs: offline validation (what `ray up` checks) and the laptop-sized
fake multi-node copy of a production config's node types."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

HEAD_TYPE = "ray.head.default"


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


def load_cluster_yaml(path: str | Path) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a cluster config must be a YAML mapping")
    return config


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate against the schema bundled with Ray, as `ray up` does.

    Returns the prepared config; a violation raises ValueError naming the offending key.
    Configs for the fake multi-node provider are complete by construction (the Ray wheel lacks
    their defaults file) and are validated as they are.
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = copy.deepcopy(config)
    try:
        if prepared.get("provider", {}).get("type") != "fake_multinode":
            prepared = prepare_config(prepared)
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        raise ValueError(f"invalid cluster config at {where}: {e.message}") from None
    except KeyError as e:
        raise ValueError(f"invalid cluster config: missing key {e}") from None
    return prepared


def local_autoscaling_config(
    config: dict[str, Any],
    *,
    cpus_per_node: int = 1,
    max_workers_per_type: int = 2,
    idle_timeout_minutes: float = 0.1,
    object_store_memory: int = 200 * 1024**2,
) -> dict[str, Any]:
    """The production node types scaled down for Ray's fake multi-node provider.

    Each worker type keeps its name, its min_workers and its kind of resources: CPU becomes
    ``cpus_per_node``, a GPU type gets one (logical) GPU and keeps its ``accelerator_type:*``
    marker, so work asking for a type's resources scales up that type. Nothing touches a real GPU.
    """
    node_types = config.get("available_node_types")
    if not node_types or HEAD_TYPE not in node_types:
        raise ValueError(f"the config needs available_node_types with a {HEAD_TYPE!r} entry")
    local_types: dict[str, Any] = {
        HEAD_TYPE: {
            "resources": {
                "CPU": min(cpus_per_node, node_types[HEAD_TYPE].get("resources", {}).get("CPU", cpus_per_node))
            },
            "node_config": {},
            "max_workers": 0,
        }
    }
    for name, spec in node_types.items():
        if name == HEAD_TYPE:
            continue
        resources = spec.get("resources", {})
        scaled: dict[str, Any] = {"CPU": min(cpus_per_node, resources.get("CPU", cpus_per_node))}
        if resources.get("GPU"):
            scaled["GPU"] = 1
        scaled.update({k: v for k, v in resources.items() if k.startswith("accelerator_type:")})
        scaled["object_store_memory"] = object_store_memory
        local_types[name] = {
            "resources": scaled,
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": min(spec.get("max_workers", max_workers_per_type), max_workers_per_type),
        }
    return {
        "cluster_name": f"{config.get('cluster_name', 'zoomvit')}-local",
        "max_workers": max_workers_per_type * (len(local_types) - 1),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": local_types,
        "head_node_type": HEAD_TYPE,
        "auth": {},
        "upscaling_speed": config.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def dump_local_config(config: dict[str, Any], source: str) -> str:
    header = (
        f"# Generated by `zoomvit cluster local {source}`: the node types of {source}, scaled down\n"
        "# for Ray's fake multi-node provider (every node is a local raylet; no cloud, no real GPU).\n"
        "#\n"
        "#   RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0 --autoscaling-config=cluster/local-autoscaling.yaml\n"
        "#   python -c 'import ray; ray.init(); "
        'ray.get(ray.remote(num_gpus=1, accelerator_type="H100")(lambda: 1).remote())\'\n'
        "#   ray status      # a gpu_h100x8 node appears, and goes after idle_timeout_minutes\n"
        "#   ray stop --force   # ends every Ray on this machine, not only this one\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)
