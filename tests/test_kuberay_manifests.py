"""cluster/kuberay/*.yaml: every object validates against the pinned schema of its kind (KubeRay's CRDs,
Kubernetes' strict JSON schemas; where they come from: tests/schemas/README.md), so a misspelt or
mistyped field fails here instead of at `kubectl apply`; and the manifests carry what a real cluster
needs: a storage class, GPUs by the standard resource, retries, Ray token authentication, and
credentials that reach the pods only by reference to a Secret."""

import copy
import functools
import json
import re

import pytest
import yaml
from conftest import REPO
from jsonschema import Draft202012Validator

KUBERAY = REPO / "cluster" / "kuberay"
SCHEMAS = REPO / "tests" / "schemas"
SCHEMA_FILES = ["kuberay-v1.7.0.json", "kubernetes-v1.32.2-strict.json"]
MANIFESTS = sorted(p.name for p in KUBERAY.glob("*.yaml"))
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|USERNAME|ACCESS_KEY|CREDENTIAL|_KEY$")
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)  # KubeRay v1.7.0's ValidateRayClusterSpec refuses token mode below it


@functools.cache
def _validators() -> dict[str, Draft202012Validator]:
    """`apiVersion/kind` (and ``ObjectMeta``) -> a validator of the vendored schema."""
    validators = {}
    for name in SCHEMA_FILES:
        doc = json.loads((SCHEMAS / name).read_text())
        refs = dict(doc["kinds"], **({"ObjectMeta": "#/$defs/ObjectMeta"} if "ObjectMeta" in doc["$defs"] else {}))
        for kind, ref in refs.items():
            validators[kind] = Draft202012Validator({"$ref": ref, "$defs": doc["$defs"]})
    return validators


def _objects(name: str) -> list[dict]:
    return [o for o in yaml.safe_load_all((KUBERAY / name).read_text()) if o]


def _all_objects() -> list[tuple[str, dict]]:
    return [(name, obj) for name in MANIFESTS for obj in _objects(name)]


def _errors(obj: dict) -> list[str]:
    """What the schema of ``obj``'s kind finds wrong with it, as `path: message` lines."""
    validator = _validators()[f"{obj['apiVersion']}/{obj['kind']}"]
    found = [(list(e.absolute_path), e.message) for e in validator.iter_errors(obj)]
    if obj["apiVersion"].startswith("ray.io/"):  # a CRD leaves metadata to the API server: check it as ObjectMeta
        meta = _validators()["ObjectMeta"].iter_errors(obj.get("metadata", {}))
        found += [(["metadata", *e.absolute_path], e.message) for e in meta]
    return [f"{'.'.join(map(str, path)) or '<top>'}: {message}" for path, message in found]


def _get(obj: dict, path: tuple):
    for key in path:
        obj = obj[key]
    return obj


def _pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in a manifest object."""
    if obj["kind"] == "Deployment":
        return [("deployment", obj["spec"]["template"]["spec"])]
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]
    ]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    (cluster,) = _objects("raycluster.yaml")
    (job,) = _objects("rayjob.yaml")
    return [("RayCluster", cluster["spec"]), ("RayJob.rayClusterSpec", job["spec"]["rayClusterSpec"])]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- the schemas ---


def test_every_kind_the_manifests_use_has_a_pinned_schema():
    kinds = {f"{obj['apiVersion']}/{obj['kind']}" for _, obj in _all_objects()}
    assert kinds == {
        "ray.io/v1/RayCluster",
        "ray.io/v1/RayJob",
        "apps/v1/Deployment",
        "v1/Service",
        "v1/PersistentVolumeClaim",
    }
    assert kinds <= set(_validators()), f"vendor a schema for {kinds - set(_validators())} (tests/schemas/vendor.py)"


def test_the_vendored_schemas_are_the_sources_recorded_in_the_readme():
    readme = (SCHEMAS / "README.md").read_text()
    for name in SCHEMA_FILES:
        source = json.loads((SCHEMAS / name).read_text())["source"]
        assert source["commit"] in readme and source["repository"] in readme, name
        assert all(path in readme for path in source["paths"]), name


@pytest.mark.parametrize(
    ("name", "index"), [(name, i) for name in MANIFESTS for i in range(len(_objects(name)))], ids=lambda v: str(v)
)
def test_every_manifest_object_validates_against_its_kinds_schema(name, index):
    obj = _objects(name)[index]
    assert _errors(obj) == [], f"{name} {obj['kind']} {obj['metadata']['name']}"


MISSPELLINGS = [
    ("raycluster.yaml", 0, ("spec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    ("raycluster.yaml", 0, ("spec", "workerGroupSpecs", 0, "replicas"), "replicass"),
    ("raycluster.yaml", 0, ("spec", "enableInTreeAutoscaling"), "enableIntreeAutoscaling"),
    (
        "raycluster.yaml",
        0,
        ("spec", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources"),
        "resource",
    ),
    ("raycluster.yaml", 0, ("metadata", "labels"), "label"),
    ("rayjob.yaml", 0, ("spec", "backoffLimit"), "backofLimit"),
    ("rayjob.yaml", 0, ("spec", "rayClusterSpec", "authOptions", "mode"), "authMode"),
    ("rayjob.yaml", 0, ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "volumes"), "volume"),
    ("mlflow.yaml", 0, ("spec", "storageClassName"), "storageClass"),
    ("mlflow.yaml", 2, ("spec", "template", "spec", "containers", 0, "volumeMounts"), "volumeMount"),
    ("mlflow.yaml", 2, ("spec", "template", "spec", "securityContext", "fsGroup"), "fsgroup"),
    ("mlflow.yaml", 3, ("spec", "selector"), "selecter"),
]


@pytest.mark.parametrize(("name", "index", "path", "misspelt"), MISSPELLINGS, ids=[m[3] for m in MISSPELLINGS])
def test_a_misspelt_field_in_a_copy_of_a_manifest_fails_validation_naming_it(name, index, path, misspelt):
    obj = copy.deepcopy(_objects(name)[index])
    assert _errors(obj) == [], "the manifest itself must be valid, so the failure below is the misspelling's"
    parent = _get(obj, path[:-1])
    parent[misspelt] = parent.pop(path[-1])
    errors = _errors(obj)
    assert errors, f"{name}: {misspelt!r} in place of {path[-1]!r} was accepted"
    assert any(repr(misspelt) in e for e in errors), errors


WRONG_VALUES = [
    ("raycluster.yaml", 0, ("spec", "workerGroupSpecs", 0, "maxReplicas"), "16"),  # an integer field
    ("raycluster.yaml", 0, ("spec", "authOptions", "mode"), "tokens"),  # enum: disabled | token
    ("rayjob.yaml", 0, ("spec", "ttlSecondsAfterFinished"), "1h"),  # an integer field
    ("mlflow.yaml", 0, ("spec", "accessModes"), "ReadWriteMany"),  # a list
    ("mlflow.yaml", 2, ("spec", "replicas"), "one"),
]


@pytest.mark.parametrize(
    ("name", "index", "path", "value"), WRONG_VALUES, ids=[f"{m[2][-1]}={m[3]}" for m in WRONG_VALUES]
)
def test_a_wrongly_typed_or_unknown_value_fails_validation(name, index, path, value):
    obj = copy.deepcopy(_objects(name)[index])
    _get(obj, path[:-1])[path[-1]] = value
    assert _errors(obj), f"{name}: {'.'.join(map(str, path))}={value!r} was accepted"


# --- what the manifests must carry ---


def test_the_shared_volume_claim_is_read_write_many_with_a_named_storage_class():
    claims = {o["metadata"]["name"]: o for o in _objects("mlflow.yaml") if o["kind"] == "PersistentVolumeClaim"}
    shared = claims["zoomvit-shared"]["spec"]
    assert shared["accessModes"] == ["ReadWriteMany"]
    assert shared["storageClassName"], "an RWX claim must name its class: default classes are ReadWriteOnce"
    for where, spec in _ray_cluster_specs():
        for group, pod in _pod_specs({"kind": "RayCluster", "spec": spec}):
            claims_used = {
                v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
            }
            assert claims_used == {"zoomvit-shared"}, f"{where} {group}"


def test_gpu_pods_are_placed_by_the_nvidia_gpu_resource_alone():
    for where, spec in _ray_cluster_specs():
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            if not group["groupName"].startswith("gpu"):
                assert "nvidia.com/gpu" not in limits, f"{where} {group['groupName']}"
                continue
            assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 8, f"{where} {group['groupName']}"
            assert "nodeSelector" not in pod and "affinity" not in pod, (
                f"{where} {group['groupName']}: node selectors are optional (documented in the manifest), not shipped"
            )
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_rayjob_retries_a_failed_run_and_its_submitter():
    (job,) = _objects("rayjob.yaml")
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1, "a failed run is retried on a new cluster (the stage cache resumes it)"
    assert spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["submissionMode"] == "K8sJobMode", "KubeRay refuses backoffLimit > 0 in InteractiveMode"
    assert spec["shutdownAfterJobFinishes"] is True


def test_ray_token_authentication_is_on_wherever_a_ray_cluster_is_made():
    for where, spec in _ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token"}, where
        assert tuple(int(p) for p in spec["rayVersion"].split(".")) >= MIN_RAY_FOR_TOKEN_AUTH, where


def test_credentials_reach_every_container_only_by_reference_to_a_secret():
    seen = set()
    for name, obj in _all_objects():
        if obj["kind"] in ("Service", "PersistentVolumeClaim"):
            continue
        for where, pod in _pod_specs(obj):
            for container in pod["containers"]:
                for env_name, entry in _env(container).items():
                    if "value" in entry:
                        assert "@" not in entry["value"], f"{name} {where} {env_name}: a URI with user info"
                    if CREDENTIAL_NAME.search(env_name):
                        seen.add(env_name)
                        assert "value" not in entry, f"{name} {where} {env_name} is a plain value"
                        assert entry["valueFrom"]["secretKeyRef"]["name"], f"{name} {where} {env_name}"
    assert {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= seen


def test_ray_pods_log_in_to_mlflow_with_the_account_the_server_is_given():
    (deployment,) = [o for o in _objects("mlflow.yaml") if o["kind"] == "Deployment"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    server_env = _env(server)
    assert server_env["MLFLOW_AUTH"]["value"] == "basic"
    admin = {
        "MLFLOW_TRACKING_USERNAME": server_env["MLFLOW_AUTH_ADMIN_USERNAME"]["valueFrom"],
        "MLFLOW_TRACKING_PASSWORD": server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"],
    }
    for where, spec in _ray_cluster_specs():
        for group, pod in _pod_specs({"kind": "RayCluster", "spec": spec}):
            env = _env(pod["containers"][0])
            assert env["MLFLOW_TRACKING_URI"]["value"] == "http://zoomvit-mlflow:5000", f"{where} {group}"
            for var, source in admin.items():
                assert env[var]["valueFrom"] == source, f"{where} {group} {var}"


def test_mlflow_state_and_auth_files_live_on_a_private_volume_only_the_server_mounts():
    objects = _objects("mlflow.yaml")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = {k: e.get("value") for k, e in _env(server).items()}
    state_dir = env["MLFLOW_STATE_DIR"]
    (mount,) = [m for m in server["volumeMounts"] if state_dir.startswith(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim != "zoomvit-shared" and all(m["mountPath"] != "/shared" for m in server["volumeMounts"])
    (claim_spec,) = [
        o["spec"] for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim
    ]
    assert claim_spec["accessModes"] == ["ReadWriteOnce"]
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert state_dir in env[key], f"{key} stays on the private volume"
    assert "umask 077" in " ".join(server["command"]), (
        "files 0600, folders 0700 (basic_auth.ini holds the admin password)"
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "one server at a time on a ReadWriteOnce volume"
    for where, spec in _ray_cluster_specs():
        for group, ray_pod in _pod_specs({"kind": "RayCluster", "spec": spec}):
            claims = {
                v["persistentVolumeClaim"]["claimName"] for v in ray_pod["volumes"] if "persistentVolumeClaim" in v
            }
            assert claim not in claims, f"{where} {group} mounts MLflow's state"
