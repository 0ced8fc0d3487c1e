"""Regenerate the vendored schema files of this folder from their pinned sources (see README.md).

    python tests/schemas/vendor.py \
        --kuberay-git-dir <clone of ray-project/kuberay>/.git --kuberay-ref v1.7.0 \
        --k8s-git-dir <clone of the kubernetes-json-schema output>/.git --k8s-ref <commit> --k8s-version v1.32.2

Both sources are read with `git show <ref>:<path>`, so the output depends only on the pinned refs.
What the conversion does, and why:

- KubeRay's CRDs: the `openAPIV3Schema` of the served `v1` version, `status` dropped (a manifest
  has none), `apiVersion`/`kind` fixed to the CRD's. The API server prunes or rejects fields a
  structural schema does not list, except under `x-kubernetes-preserve-unknown-fields`; JSON
  Schema allows them unless told, so every object schema with `properties` and without that marker
  gets `additionalProperties: false`, and a misspelt field fails as it would in `kubectl apply
  --validate=strict`. `nullable: true` becomes a `null` type. CEL rules
  (`x-kubernetes-validations`) cannot be evaluated here and are dropped.
- Kubernetes core kinds: the `-standalone-strict` JSON schemas (already `additionalProperties:
  false` everywhere), unchanged in meaning.
- Both: descriptions, defaults, formats and the other `x-kubernetes-*` annotations are dropped (they
  do not change what validates), and every schema subtree that occurs more than once is stored once
  under `$defs` and referenced (the CRDs repeat the whole pod template for every group).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DRAFT = "https://json-schema.org/draft/2020-12/schema"
KUBERAY_CRDS = {
    "RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
    "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
}
K8S_KINDS = {  # the core kinds cluster/kuberay/*.yaml use
    "Deployment": "deployment-apps-v1.json",
    "Service": "service-v1.json",
    "PersistentVolumeClaim": "persistentvolumeclaim-v1.json",
}
DROP = {"description", "default", "format", "example", "nullable", "x-kubernetes-validations"}
SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
MIN_SHARED_CHARS = 120  # smaller repeated subtrees stay inline


def git_show(git_dir: str, ref: str, path: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"{ref}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def strict_crd_schema(node: dict) -> dict:
    """A CRD structural schema as JSON Schema that, like the API server, knows no unlisted field."""
    kept = {k: v for k, v in node.items() if k not in DROP and not k.startswith("x-kubernetes-")}
    out = _children(kept, strict_crd_schema)
    unlisted = "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and unlisted:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def plain_schema(node: dict) -> dict:
    """A JSON schema with what does not change validation removed (the strict files are strict already)."""
    kept = {k: v for k, v in node.items() if k not in DROP and not k.startswith("x-kubernetes-")}
    return _children(kept, plain_schema)


def _children(node: dict, fn) -> dict:
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: fn(sub) for name, sub in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = fn(node["additionalProperties"])
    if "items" in node:
        out["items"] = fn(node["items"])
    for key in SUBSCHEMA_LISTS:
        if key in node:
            out[key] = [fn(sub) for sub in node[key]]
    return out


def share_repeated_subtrees(roots: dict[str, dict]) -> dict[str, dict]:
    """``$defs`` holding ``roots`` under their names plus every repeated subtree once, referenced."""
    defs: dict[str, dict] = {}
    uses: dict[str, int] = {}

    def intern(node: dict) -> dict:
        node = _children(node, intern)
        text = json.dumps(node, sort_keys=True)
        if len(text) < MIN_SHARED_CHARS:
            return node
        name = "s" + hashlib.sha1(text.encode()).hexdigest()[:12]
        defs[name] = node
        uses[name] = uses.get(name, 0) + 1
        return {"$ref": f"#/$defs/{name}"}

    def inline_single_use(node: dict) -> dict:
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/s") and uses[ref.rsplit("/", 1)[1]] == 1:
            return inline_single_use(defs[ref.rsplit("/", 1)[1]])
        return _children(node, inline_single_use)

    interned = {name: _children(root, intern) for name, root in roots.items()}
    out = {name: inline_single_use(root) for name, root in interned.items()}
    for name in sorted(defs):
        if uses[name] > 1:
            out[name] = inline_single_use(defs[name])
    return out


def write(path: Path, source: dict, kinds: dict[str, str], defs: dict[str, dict]) -> None:
    doc = {"$schema": DRAFT, "source": source, "kinds": kinds, "$defs": defs}
    path.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{path.relative_to(HERE.parents[1])}: {path.stat().st_size / 1024:.0f} KiB, {len(defs)} definitions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kuberay-git-dir", required=True)
    parser.add_argument("--kuberay-ref", default="v1.7.0")
    parser.add_argument("--k8s-git-dir", required=True)
    parser.add_argument("--k8s-ref", required=True)
    parser.add_argument("--k8s-version", default="v1.32.2")
    args = parser.parse_args()

    def rev(git_dir, ref):
        cmd = ["git", f"--git-dir={git_dir}", "rev-parse", f"{ref}^{{commit}}"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    roots, kinds = {}, {}
    for kind, path in KUBERAY_CRDS.items():
        crd = yaml.safe_load(git_show(args.kuberay_git_dir, args.kuberay_ref, path))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strict_crd_schema(version["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        schema["properties"]["apiVersion"] = {"type": "string", "enum": [f"{crd['spec']['group']}/v1"]}
        schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
        roots[kind] = schema
        kinds[f"{crd['spec']['group']}/v1/{kind}"] = f"#/$defs/{kind}"
    source = {
        "repository": "ray-project/kuberay",
        "ref": args.kuberay_ref,
        "commit": rev(args.kuberay_git_dir, args.kuberay_ref),
        "paths": sorted(KUBERAY_CRDS.values()),
    }
    write(HERE / f"kuberay-{args.kuberay_ref}.json", source, kinds, share_repeated_subtrees(roots))

    folder = f"{args.k8s_version}-standalone-strict"
    roots, kinds = {}, {}
    for kind, name in K8S_KINDS.items():
        schema = plain_schema(json.loads(git_show(args.k8s_git_dir, args.k8s_ref, f"{folder}/{name}")))
        roots[kind] = schema
        api_version = schema["properties"]["apiVersion"]["enum"][0]
        kinds[f"{api_version}/{kind}"] = f"#/$defs/{kind}"
    roots["ObjectMeta"] = roots["Deployment"]["properties"]["metadata"]  # for the custom resources' metadata
    source = {
        "format": "yannh/kubernetes-json-schema (openapi2jsonschema), -standalone-strict",
        "repository": "redacid/k8s-json-scheme",
        "commit": rev(args.k8s_git_dir, args.k8s_ref),
        "paths": sorted(f"{folder}/{name}" for name in K8S_KINDS.values()),
    }
    write(HERE / f"kubernetes-{args.k8s_version}-strict.json", source, kinds, share_repeated_subtrees(roots))


if __name__ == "__main__":
    main()
