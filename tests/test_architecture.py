"""The package's layering, read from its source (no imports run): no import cycle anywhere in
``zoomvit/``, and the boundaries the design names.

Every ``import`` statement counts, wherever it stands: at module level, inside a function (an import
deferred for speed still needs the other module when that code runs) and under ``TYPE_CHECKING`` (a
reader still needs the other module to follow the code). Deferring an import can hide a cycle from
Python, never from this test. A ``from package import name`` is an edge to the submodule ``name`` when
there is one, else to the package's ``__init__``; importing a submodule is not an edge to its parent
package (Python runs the parent first, but the submodule does not need its names).
"""

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "zoomvit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(path: Path, name: str) -> Iterator[tuple[str, bool]]:
    """Every dotted name an import statement anywhere in the file names (``from a import b``: ``a.b``;
    relative ones resolved), and whether the import runs when the module is imported (at module or
    class level, not in a function, not under ``TYPE_CHECKING``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, eager: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((alias.name, eager) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join([*base, child.module] if child.module else base)
                else:
                    source = child.module or ""
                yield from ((f"{source}.{alias.name}", eager) for alias in child.names)
            else:
                deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                    isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
                )
                yield from visit(child, eager and not deferred)

    yield from visit(ast.parse(path.read_text(), filename=str(path)), True)


def _owner(name: str) -> str | None:
    """The package module a dotted name lives in (``zoomvit.a.b.func`` -> ``zoomvit.a.b``), or None outside."""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@cache
def _graph(eager_only: bool = False) -> dict[str, frozenset[str]]:
    """Module -> the package modules it imports (``eager_only``: those its own import runs)."""
    graph = {}
    for name, path in _modules().items():
        names = [n for n, eager in _imported(path, name) if (eager or not eager_only) and n.split(".")[0] == "zoomvit"]
        # ``from a import b``: b's own module when it is one, else a (the names inside it)
        targets = {n if n in _modules() else _owner(n) for n in names}
        graph[name] = frozenset(t for t in targets if t and t != name)
    return graph


@cache
def _third_party(name: str, eager_only: bool = False) -> frozenset[str]:
    """The top-level names of what a package module imports from outside the package."""
    found = (n.split(".")[0] for n, eager in _imported(_modules()[name], name) if n and (eager or not eager_only))
    return frozenset(n for n in found if n not in ("zoomvit", "__future__"))


def _cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _reachable(start: str, *, eager_only: bool = False) -> set[str]:
    """Every package module ``start`` needs, directly or through others (``start`` and its submodules
    included); ``eager_only``: those that importing it loads."""
    graph = _graph(eager_only)
    seen = {m for m in graph if m == start or m.startswith(start + ".")}
    todo = list(seen)
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _explain(cycles: list[list[str]], graph: dict[str, frozenset[str]]) -> str:
    return "\n".join(
        f"cycle: {', '.join(c)}\n"
        + "\n".join(f"  {m} imports {', '.join(sorted(graph[m] & set(c)))}" for m in c if graph[m] & set(c))
        for c in cycles
    )


def test_the_walk_sees_the_package_and_its_imports():
    """The checks below read what they should: every module, relative and function-level imports too."""
    graph, eager = _graph(), _graph(eager_only=True)
    assert len(graph) > 40 and "zoomvit.pipeline.stage_table" in graph
    assert "zoomvit.pipeline.stage_table" in graph["zoomvit.pipeline.plan"]
    assert "zoomvit.train.recipes" in graph["zoomvit.pipeline.stage_table"], "imported inside the stage runners"
    assert "zoomvit.train.recipes" not in eager["zoomvit.pipeline.stage_table"]
    assert "zoomvit.checkpoints" in graph["zoomvit.pipeline.stage_table"], "imported under TYPE_CHECKING"
    assert "zoomvit.checkpoints" not in eager["zoomvit.pipeline.stage_table"]
    assert "zoomvit.pipeline.cache.interface" in graph["zoomvit.pipeline.cache.local"]
    assert "zoomvit.train.objectives" in graph["zoomvit.train.pyfunc_model"], "imported inside load_context"
    assert "zoomvit.pipeline.cache.local" in graph["zoomvit.pipeline.cache"], "re-exported by the package"
    assert _cycles({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}) == [
        ["a", "b", "c"]
    ]


def test_relative_deferred_and_type_checking_imports_are_resolved(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "if TYPE_CHECKING:\n    from zoomvit.a import A\n"
        "class C:\n    import zoomvit.b\n"
        "def f():\n    import zoomvit.c\n"
    )
    found = set(_imported(module, "zoomvit.pkg.sub.mod"))
    assert {
        ("zoomvit.pkg.sub.sibling", True),
        ("zoomvit.pkg.other.thing", True),
        ("zoomvit.a.A", False),
        ("zoomvit.b", True),
        ("zoomvit.c", False),
    } <= found


def test_no_import_cycle_between_modules():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, _explain(cycles, graph)


def test_no_import_cycle_between_the_packages_parts():
    """Each subpackage (``zoomvit.train``, ``zoomvit.tracking``, ...) and top-level module taken as one:
    they form layers, each importing only parts below it (models and data at the bottom, the pipeline
    and the command line at the top), never one that imports it back."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        graph.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    frozen = {k: frozenset(v) for k, v in graph.items()}
    cycles = _cycles(frozen)
    assert not cycles, _explain(cycles, frozen)


@pytest.mark.parametrize(
    ("package", "must_not_reach", "must_not_import"),
    [
        # the models are plain PyTorch/timm: usable without a cluster or a tracking server
        ("zoomvit.models", ("zoomvit.pipeline", "zoomvit.tracking", "zoomvit.train"), ("ray", "mlflow")),
        # the stage cache knows nothing of what it stores: no training code (torch), no MLflow
        ("zoomvit.pipeline.cache", ("zoomvit.train", "zoomvit.tracking"), ("torch", "mlflow", "ray")),
        # MLflow bookkeeping reads no training code; the pipeline joins the two
        ("zoomvit.tracking", ("zoomvit.train", "zoomvit.pipeline"), ()),
        # training reports to tracking, and knows nothing of the pipeline that runs it
        ("zoomvit.train", ("zoomvit.pipeline",), ()),
    ],
)
def test_a_layer_imports_nothing_above_it(package, must_not_reach, must_not_import):
    """What ``package`` needs, directly or through any other package module, stays below it; of the
    libraries named, its own modules import none anywhere, and importing it loads none."""
    needed = _reachable(package)
    above = sorted(m for m in needed if any(m == p or m.startswith(f"{p}.") for p in must_not_reach))
    assert not above, f"{package} needs {above}"
    own = {m for m in needed if m == package or m.startswith(f"{package}.")}
    banned = set(must_not_import)
    direct = sorted((m, n) for m in own for n in _third_party(m) & banned)
    assert not direct, f"{package} imports {direct}"
    loaded = sorted((m, n) for m in _reachable(package, eager_only=True) for n in _third_party(m, True) & banned)
    assert not loaded, f"importing {package} loads {loaded} (through the modules it imports)"
