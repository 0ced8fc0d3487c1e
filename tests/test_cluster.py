"""cluster/: launcher YAMLs validate like `ray up`, the local autoscaling config is derived from
the production node types and really autoscales, the KubeRay manifests carry autoscaling; one image
(cluster/Dockerfile, on a pinned Ray base) is named by every config; no config carries a credential
in plain text. The KubeRay manifests' schema checks: tests/test_kuberay_manifests.py."""

import copy
import json
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from servers import free_port, ray_env, ray_head, shutdown_ray_local

from zoomvit.cluster_config import HEAD_TYPE, load_cluster_yaml, local_autoscaling_config, validate_cluster_config

CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml", "local-autoscaling.yaml"]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_every_launcher_yaml_validates_like_ray_up(name):
    prepared = validate_cluster_config(load_cluster_yaml(CLUSTER / name))
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == HEAD_TYPE
    assert {"cpu_ingest", "gpu_a100x8", "gpu_h100x8"} <= set(types)
    for name, spec in types.items():
        if name != HEAD_TYPE:
            assert spec["min_workers"] == 0 and spec["max_workers"] >= 1


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("available_node_types", "cpu_ingest", "max_workers"), "many", "available_node_types.cpu_ingest.max_workers"),
        (("idle_timeout_minute",), 5, "idle_timeout_minute"),
        (("available_node_types", "gpu_a100x8", "resourcez"), {"GPU": 8}, "resourcez"),
    ],
)
def test_a_broken_copy_is_rejected_naming_the_offending_key(path, value, named):
    config = copy.deepcopy(load_cluster_yaml(CLUSTER / "aws.yaml"))
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        validate_cluster_config(config)


def test_production_yamls_keep_the_head_free_of_work_and_scale_from_zero():
    for name in ("aws.yaml", "gcp.yaml"):
        config = load_cluster_yaml(CLUSTER / name)
        assert config["available_node_types"][HEAD_TYPE]["resources"]["CPU"] == 0
        assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
        assert any("pip install" in c and "zoomvit" in c for c in config["setup_commands"])
        assert any("MLFLOW_TRACKING_URI" in c for c in config["worker_setup_commands"])
        gpu_types = [t for t, s in config["available_node_types"].items() if s["resources"].get("GPU")]
        assert gpu_types and all(
            any(k.startswith("accelerator_type:") for k in config["available_node_types"][t]["resources"])
            for t in gpu_types
        )


@pytest.mark.parametrize(("name", "client"), [("aws.yaml", "boto3"), ("gcp.yaml", "google-api-python-client")])
def test_production_yamls_authenticate_every_node_and_keep_what_the_autoscaler_needs(name, client):
    config = load_cluster_yaml(CLUSTER / name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "every node gets the token"
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
    assert any("zoomvit[cloud]" in c for c in config["setup_commands"]), "s3fs / gcsfs for s3:// and gs:// shards"
    assert any(client in c for c in config["head_setup_commands"]), "Ray's default head setup is replaced"
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start, "the dashboard is reached through `ray dashboard`'s SSH tunnel"


def test_the_shipped_local_config_is_the_aws_node_types_scaled_down():
    shipped = load_cluster_yaml(CLUSTER / "local-autoscaling.yaml")
    assert shipped == local_autoscaling_config(load_cluster_yaml(CLUSTER / "aws.yaml")), (
        "regenerate with: zoomvit cluster local cluster/aws.yaml -o cluster/local-autoscaling.yaml"
    )
    types = shipped["available_node_types"]
    assert (
        types["gpu_h100x8"]["resources"]["GPU"] == 1 and types["gpu_h100x8"]["resources"]["accelerator_type:H100"] == 1
    )
    assert "GPU" not in types["cpu_ingest"]["resources"]
    assert all(s["resources"]["CPU"] <= 1 for s in types.values())
    assert shipped["provider"]["type"] == "fake_multinode"


def _kuberay(name):
    return list(yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()))


def test_kuberay_manifests_carry_autoscaling_worker_groups_and_resource_requests():
    (cluster,) = _kuberay("raycluster.yaml")
    (job,) = _kuberay("rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "the RayJob's cluster must be raycluster.yaml's"
    assert "pipelines/full.py" in job["spec"]["entrypoint"] and job["spec"]["shutdownAfterJobFinishes"]

    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    aws_types = load_cluster_yaml(CLUSTER / "aws.yaml")["available_node_types"]
    assert set(groups) == {t.replace("_", "-") for t in aws_types if t != HEAD_TYPE}
    for name, group in groups.items():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert group["maxReplicas"] == aws_types[name.replace("-", "_")]["max_workers"]
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, f"{name}: Guaranteed QoS, so Ray's view of the pod matches the node"
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # secrets: by reference
        assert env["MLFLOW_TRACKING_URI"].startswith("http://") and env["ZOOMVIT_ARTIFACT_ROOT"].startswith("/shared")
        if name.startswith("gpu"):
            assert limits["nvidia.com/gpu"] == 8
            marker = json.loads(json.loads(group["rayStartParams"]["resources"]))
            assert marker == {f"accelerator_type:{name.split('-')[1][:4].upper()}": 1}
        else:
            assert "nvidia.com/gpu" not in limits

    objects = {(m["kind"], m["metadata"]["name"]): m for m in _kuberay("mlflow.yaml")}
    assert objects["Service", "zoomvit-mlflow"]["spec"]["type"] == "ClusterIP"
    assert objects["PersistentVolumeClaim", "zoomvit-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]


# --- one image for every cluster: cluster/Dockerfile ---

DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERFILE_INSTRUCTIONS = {
    "FROM", "RUN", "COPY", "ADD", "WORKDIR", "ENV", "ARG", "USER", "LABEL", "EXPOSE", "ENTRYPOINT", "CMD", "SHELL",
    "VOLUME", "STOPSIGNAL", "HEALTHCHECK", "ONBUILD",
}  # fmt: skip
BASE_IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>cu\d+|gpu)")
# What Ray publishes for `rayproject/ray` (ray-project/ray, ray-images.yaml: its `python` and
# `platforms` lists; `-gpu` aliases cu121): see cluster/README.md, "The image", for how this was checked.
RAY_IMAGE_PYTHONS = {"310", "311", "312", "313"}
RAY_IMAGE_CUDA = {"cu117", "cu118", "cu121", "cu123", "cu124", "cu125", "cu126", "cu128", "cu129"}
# The CUDA of torch's default PyPI wheels (their nvidia-cuda-runtime-cu12==12.8.90 requirement; 2.11+ need CUDA 13).
TORCH_WHEEL_CUDA = {"2.9.1": "cu128", "2.10.0": "cu128"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments and blank lines dropped, backslash continuations joined."""
    instructions, pending = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, inside a continuation too
        pending.append(stripped.removesuffix("\\").strip())
        if stripped.endswith("\\"):
            continue
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = []
    assert not pending, "the last instruction ends in a line continuation"
    return instructions


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _image_tag() -> str:
    """The Dockerfile's naming convention: zoomvit:<project version>-ray<base image tag>."""
    (base,) = [args for keyword, args in parse_dockerfile(DOCKERFILE.read_text()) if keyword == "FROM"]
    return f"{_project()['version']}-ray{base.removeprefix('rayproject/ray:')}"


def _images_named_in(obj) -> list[str]:
    if isinstance(obj, dict):
        own = [obj["image"]] if isinstance(obj.get("image"), str) else []
        return own + [i for v in obj.values() for i in _images_named_in(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in _images_named_in(v)]
    return []


def test_the_dockerfile_parses_and_builds_on_the_pinned_ray_base_image():
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    assert {keyword for keyword, _ in instructions} <= DOCKERFILE_INSTRUCTIONS
    assert instructions[0][0] == "FROM" and [k for k, _ in instructions].count("FROM") == 1
    base = BASE_IMAGE.fullmatch(instructions[0][1])
    assert base, f"{instructions[0][1]}: not a rayproject/ray:<version>-py3XX-<cuda> tag"
    ray_version, python = base["ray"], f"3.{base['py'][1:]}"

    ray_requirement = next(Requirement(r) for r in _project()["dependencies"] if Requirement(r).name == "ray")
    assert ray_requirement.specifier.contains(ray_version), f"Ray {ray_version} is outside {ray_requirement}"
    assert SpecifierSet(_project()["requires-python"]).contains(python), f"Python {python}"
    assert base["py"] in RAY_IMAGE_PYTHONS and base["platform"] in RAY_IMAGE_CUDA, "a combination Ray publishes"
    for name in ("raycluster.yaml", "rayjob.yaml"):
        (manifest,) = _kuberay(name)
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        assert spec["rayVersion"] == ray_version, f"{name}: KubeRay starts the image's Ray"

    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    ray_pin = re.search(r'"ray\[[\w,]+\]==([\d.]+)"', runs)
    assert ray_pin and ray_pin[1] == ray_version, "installing the project keeps the base image's Ray"
    torch = re.search(r'"torch==([\d.]+)"', runs)
    assert torch, "torch is pinned: its wheel's CUDA must be the base image's"
    assert TORCH_WHEEL_CUDA.get(torch[1]) == base["platform"], f"torch {torch[1]}'s CUDA is not {base['platform']}"
    assert re.search(r'pip install .*-e "\.\[cloud\]"', runs), "the project with its object-storage filesystems"
    assert ("WORKDIR", "/home/ray/zoomvit") in instructions, "where the manifests and runtime envs expect it"
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            assert all((REPO / src).exists() for src in sources), args


def test_every_cluster_config_names_the_dockerfiles_one_image():
    images = {}
    for name in ("aws.yaml", "gcp.yaml"):
        docker = load_cluster_yaml(CLUSTER / name)["docker"]
        images.update(
            {f"{name} docker.{key}": docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
        )
    for name in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml"):
        for i, image in enumerate(i for m in _kuberay(name) for i in _images_named_in(m)):
            images[f"{name} container {i}"] = image
    assert len(images) >= 2 + 4 + 4 + 1, images
    assert len(set(images.values())) == 1, f"one image everywhere: {images}"
    (image,) = set(images.values())
    tag = _image_tag()
    assert re.fullmatch(rf"(?:[\w.\-]+(?::\d+)?/)*zoomvit:{re.escape(tag)}", image), f"{image}: not zoomvit:{tag}"
    assert f"zoomvit:{tag}" in DOCKERFILE.read_text(), "the Dockerfile's header names its own tag"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launchers_mount_storage_on_the_host_and_keep_mlflows_state_off_the_shared_volume(name):
    config = load_cluster_yaml(CLUSTER / name)
    docker = config["docker"]
    init = " ".join(config["initialization_commands"])
    assert "mount" in init and "/shared" in init, "mounted on the host: a container cannot mount NFS"
    assert "-v /shared:/shared" in docker["run_options"]
    assert not any("mount " in c for c in config["setup_commands"]), "setup commands run inside the container"
    (state_mount,) = [o for o in docker["head_run_options"] if o.endswith(":/home/ray/mlflow_server")]
    host_dir = state_mount.split()[1].split(":")[0]
    assert f"install -d -m 0700 -o 1000 -g 100 {host_dir}" in init, "a private folder, owned by the image's user"
    (serve,) = [c for c in config["head_setup_commands"] if "serve.sh" in c]
    assert "umask 077" in serve and "MLFLOW_STATE_DIR=$HOME/mlflow_server" in serve
    assert "/shared/mlflow" not in (CLUSTER / name).read_text(), (
        "auth files and the store off the world-readable volume"
    )


def test_no_cluster_config_or_instruction_puts_a_credential_in_plain_text_or_the_runtime_env():
    plain = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)[A-Z_]*=[\"']?[^\s$;\"']")  # a value, not $(...) or $VAR
    for name in ("aws.yaml", "gcp.yaml"):
        config = load_cluster_yaml(CLUSTER / name)
        for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
            for command in config.get(key, []):
                assert not plain.search(command), f"{name} {key}: {command}"
                assert "runtime-env" not in command, f"{name} {key}: runtime envs are shown by the dashboard"
    readme = (CLUSTER / "README.md").read_text()
    commit_only = '--runtime-env-json "$(zoomvit runtime-env)"'  # the checkout's git commit, nothing else
    for block in readme.split("```")[1::2]:
        assert "runtime-env-json" not in block.replace(commit_only, "") and not plain.search(block), block


AUTOSCALE_PROBE = textwrap.dedent(
    """
    import json, sys, time
    import ray

    ray.init(address=sys.argv[1], log_to_driver=False)

    def workers():
        return sorted(
            next((k for k in n["Resources"] if k.startswith("accelerator_type:")), "cpu")
            for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0
        )

    seen = {"start": workers()}
    ray.get(ray.remote(num_cpus=1)(lambda: 1).remote(), timeout=120)
    seen["after_cpu_task"] = workers()
    ray.get(ray.remote(num_cpus=1, num_gpus=1, accelerator_type="H100")(lambda: 1).remote(), timeout=120)
    seen["after_h100_task"] = workers()
    deadline = time.time() + 120
    while workers() and time.time() < deadline:
        time.sleep(1)
    seen["after_idle"] = workers()
    print(json.dumps(seen))
    """
)


@pytest.mark.slow
@pytest.mark.own_ray
def test_local_autoscaling_cluster_scales_the_requested_node_type_up_then_down(tmp_path):
    """On a head of its own (its own temp dir and ports: the fake nodes the autoscaler starts inherit
    the head's temp dir), stopped by its own processes, where ray.cluster_utils.AutoscalingCluster
    would run `ray stop --force`."""
    shutdown_ray_local()
    port = free_port()
    config = load_cluster_yaml(CLUSTER / "local-autoscaling.yaml")
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_path = tmp_path / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = ray_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    start = ["--node-ip-address=127.0.0.1", f"--autoscaling-config={config_path}"]
    with ray_head(*start, num_cpus=0, port=port, dashboard=False, env=env):
        probe = subprocess.run(
            [sys.executable, "-c", AUTOSCALE_PROBE, f"127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["start"] == []
    assert seen["after_cpu_task"] == ["cpu"], "a CPU-only task scales up cpu_ingest, not a GPU type"
    assert seen["after_h100_task"] in (["accelerator_type:H100"], ["accelerator_type:H100", "cpu"])
    assert seen["after_idle"] == [], "idle workers are removed after idle_timeout_minutes"


@pytest.mark.slow
def test_use_gpu_auto_counts_gpu_node_types_the_launcher_can_add_at_zero_nodes(ray_local, tmp_path, monkeypatch):
    from zoomvit.gpus import resolve_use_gpu

    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_use_gpu("auto") is False, "a CPU-only cluster with no launcher config"
    bootstrap = load_cluster_yaml(CLUSTER / "aws.yaml")  # on the head `ray up` leaves the config here
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(bootstrap))
    assert resolve_use_gpu("auto") is True, "GPU node types at 0 nodes, which the autoscaler adds on demand"
    for spec in bootstrap["available_node_types"].values():
        spec.get("resources", {}).pop("GPU", None)
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(bootstrap))
    assert resolve_use_gpu("auto") is False
    assert resolve_use_gpu(True) is True and resolve_use_gpu(False) is False
