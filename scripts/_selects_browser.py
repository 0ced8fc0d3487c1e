"""Would ``pytest ARGS`` run the browser test? scripts/test.sh asks before it installs Chromium.

The browser tests are found in the test sources, not named here: in the test modules under the
testpaths that import Playwright, the test functions whose code mentions Playwright or Chromium (every
test of such a module where only its helpers do). Their node ids, module marks (``pytestmark``) and decorator marks
are matched against the arguments the way pytest selects: the paths and node ids given (the testpaths
when none), ``--ignore``/``--ignore-glob``/``--deselect``, ``-m`` and ``-k`` (pytest's own parser and
expression language). Prints ``yes: <node ids>`` or ``no: <why>``; anything it cannot tell counts as
selected. Run it from the repository root with the environment's Python (it needs pytest).
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSER = re.compile(r"playwright|chromium", re.IGNORECASE)


@dataclass(frozen=True)
class Test:
    path: Path  # absolute
    parts: tuple[str, ...]  # (Class, function) or (function,)
    marks: frozenset[str]

    @property
    def nodeid(self) -> str:
        return "::".join((self.path.relative_to(ROOT).as_posix(), *self.parts))

    def keywords(self) -> set[str]:
        """The names ``-k`` matches: the node names below the root directory, and the marks."""
        rel = self.path.relative_to(ROOT)
        return {*rel.parts, *self.parts, *self.marks}


def _mark_names(node: ast.expr) -> list[str]:
    """``pytest.mark.slow``, ``pytest.mark.skipif(...)`` or a list of them -> their names."""
    if isinstance(node, ast.List | ast.Tuple):
        return [name for element in node.elts for name in _mark_names(element)]
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
        return [node.attr]
    return []


def _imports_playwright(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "playwright" for alias in node.names)
    return isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "playwright"


def _pytestmark(body: list[ast.stmt]) -> set[str]:
    marks: set[str] = set()
    for stmt in body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets):
            marks.update(_mark_names(stmt.value))
    return marks


def browser_tests(root: Path = ROOT, testpaths: list[str] | None = None) -> list[Test]:
    found: list[Test] = []
    for testpath in testpaths or ["tests"]:
        for path in sorted((root / testpath).rglob("test_*.py")):
            source = path.read_text(encoding="utf-8")
            if "playwright" not in source:
                continue
            tree = ast.parse(source)
            if not any(_imports_playwright(node) for node in ast.walk(tree)):
                continue
            module_marks = _pytestmark(tree.body)
            tests: list[tuple[Test, bool]] = []
            for node in tree.body:
                scopes = [((), node, module_marks)]
                if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                    class_marks = module_marks | _pytestmark(node.body)
                    class_marks |= {m for d in node.decorator_list for m in _mark_names(d)}
                    scopes = [((node.name,), child, class_marks) for child in node.body]
                for prefix, func, marks in scopes:
                    if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef) and func.name.startswith("test"):
                        own = frozenset(marks | {m for d in func.decorator_list for m in _mark_names(d)})
                        uses = bool(BROWSER.search(ast.get_source_segment(source, func) or ""))
                        tests.append((Test(path.resolve(), (*prefix, func.name), own), uses))
            # its tests that mention the browser, or all of them where only its helpers do
            found.extend(t for t, uses in tests if uses or not any(u for _, u in tests))
    return found


def _parse(args: list[str]):
    from _pytest.config import get_config

    config = get_config(list(args))
    if not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        config.pluginmanager.load_setuptools_entrypoints("pytest11")  # their options (--timeout N)
    namespace, _unknown = config._parser.parse_known_and_unknown_args(args)
    return namespace


def _within(path: Path, target: Path) -> bool:
    return path == target or target in path.parents


def _matches_path(test: Test, arg: str, cwd: Path) -> bool:
    where, *names = arg.split("::")
    target = (cwd / where).resolve()
    if not _within(test.path, target):
        return False
    names = [re.sub(r"\[.*\]$", "", n) for n in names]  # a parametrized id selects its function
    return tuple(names) == test.parts[: len(names)]


def selected(args: list[str], root: Path = ROOT, cwd: Path | None = None) -> tuple[bool, str]:
    """(whether ``pytest args`` run a browser test, which ones or why not)."""
    from _pytest.mark.expression import Expression

    cwd = cwd or Path.cwd()
    ini = tomllib.loads((root / "pyproject.toml").read_text()).get("tool", {}).get("pytest", {})
    testpaths = ini.get("ini_options", {}).get("testpaths", ["tests"])
    tests = browser_tests(root, testpaths)
    if not tests:
        return False, "no test in " + ", ".join(testpaths) + " drives a browser"
    ns = _parse(args)
    for flag in ("collectonly", "showfixtures", "show_fixtures_per_test", "markers", "help", "version"):
        if getattr(ns, flag, False):
            return False, f"--{flag}: no test runs"
    paths = getattr(ns, "file_or_dir", None) or [str(root / p) for p in testpaths]
    ignore = [(cwd / p).resolve() for p in (getattr(ns, "ignore", None) or [])]
    ignore_glob = getattr(ns, "ignore_glob", None) or []
    deselect = tuple(getattr(ns, "deselect", None) or [])
    markexpr = Expression.compile(ns.markexpr) if getattr(ns, "markexpr", "") else None
    keyword = ns.keyword.lstrip() if getattr(ns, "keyword", "") else ""
    keyexpr = Expression.compile(keyword) if keyword else None
    chosen = []
    for test in tests:
        if not any(_matches_path(test, arg, cwd) for arg in paths):
            continue
        if any(_within(test.path, p) for p in ignore) or any(fnmatch.fnmatch(str(test.path), g) for g in ignore_glob):
            continue
        if deselect and test.nodeid.startswith(deselect):
            continue
        if markexpr and not markexpr.evaluate(lambda name, /, marks=test.marks, **kw: bool(kw) or name in marks):
            continue
        names = [n.lower() for n in test.keywords()]
        if keyexpr and not keyexpr.evaluate(lambda sub, /, names=names, **kw: any(sub.lower() in n for n in names)):
            continue
        chosen.append(test.nodeid)
    if chosen:
        return True, " ".join(chosen)
    return False, "these arguments deselect " + " ".join(t.nodeid for t in tests)


def main(args: list[str]) -> None:
    try:
        yes, what = selected(args)
    except Exception as e:  # cannot tell: count it as selected
        yes, what = True, f"(could not tell from the arguments: {type(e).__name__}: {e})"
    print(f"{'yes' if yes else 'no'}: {what}")


if __name__ == "__main__":
    main(sys.argv[1:])
