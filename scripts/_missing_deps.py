"""What ``pip install -e '.[EXTRA]'`` would still have to do in this environment, read from pyproject.toml.

    python scripts/_missing_deps.py ROOT [--extra dev]

Prints one line per problem, nothing when there is none: a requirement of ``[project] dependencies``
(and of the extras named) that is not installed or not at a version in its range, with the
requirements of the extras it asks for itself (``moto[server]``, ``ray[train,data,default]``); and
the project itself when it is not installed from ROOT (another checkout's editable install counts as
missing). Reads installed metadata only: imports none of them. scripts/test.sh and scripts/demo.sh run
it to decide whether to install.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh virtual environment: pip's own copy
    from pip._vendor.packaging.requirements import Requirement


def _extra_requires(dist: md.Distribution, extra: str) -> list[str]:
    """The requirements ``dist[extra]`` adds (its entries whose marker names that extra)."""
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker and "extra" in str(req.marker) and req.marker.evaluate({"extra": extra}):
            out.append(line)
    return out


def missing(root: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"pyproject.toml has no extra {unknown}: it has {sorted(optional)}")
    problems: list[str] = []
    seen: set[str] = set()

    def check(line: str, extra: str = "") -> None:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": extra}):
            return
        if str(req) in seen:
            return
        seen.add(str(req))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{req} (not installed)")
            return
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req} (found {dist.version})")
            return
        for wanted in sorted(req.extras):
            for sub in _extra_requires(dist, wanted):
                check(sub, wanted)

    for line in project.get("dependencies", []):
        check(line)
    for extra in extras:
        for line in optional[extra]:
            check(line, extra)

    name = project["name"]
    try:
        md.distribution(name)
        spec = importlib.util.find_spec(name)  # finds, does not import
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin is None or root.resolve() not in origin.parents:
            problems.append(f"{name} (installed from {origin.parent if origin else '?'}, not from {root.resolve()})")
    except md.PackageNotFoundError:
        problems.append(f"{name} (this checkout, not installed)")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args()
    for line in missing(args.root, [e for e in args.extra if e]):
        print(line)


if __name__ == "__main__":
    main()
