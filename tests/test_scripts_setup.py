"""The two commands' set-up (scripts/_setup.sh and its Python helper): the platform and the prerequisites
checked in the first seconds, which environment, what is installed; nothing runs sudo or a package
manager; the browser test selected by its marker. No network, no Ray: fakes on a PATH of their own
where a branch needs them; the one test that creates a virtual environment stops at pip, which has no
index to install from."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

SCRIPTS = REPO / "scripts"
BROWSER_TEST = (
    "tests/test_pipeline_e2e.py::test_the_mlflow_ui_shows_runs_figures_models_and_a_comparison_in_headless_chromium"
)
sys.path.insert(0, str(SCRIPTS))
import _missing_deps  # noqa: E402

sys.path.remove(str(SCRIPTS))


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakebin(tmp_path):
    """A directory of fakes to put first on PATH: ``add(name, body)``; ``logged(name)`` is a fake that
    only records its calls (in ``calls``)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    log.touch()

    class Bin:
        path = bin_
        calls = log

        def add(self, name: str, body: str) -> None:
            _script(bin_ / name, body)

        def logged(self, name: str) -> None:
            _script(bin_ / name, f'echo "{name} $*" >>"{log}"\nexit 1\n')

    return Bin()


def _setup(snippet: str, *args: str, path: str, env: dict | None = None, cwd: Path = REPO):
    """``snippet`` run after sourcing scripts/_setup.sh, with ``$ZV_PY`` this interpreter."""
    script = f'set -euo pipefail\nZV_NAME=t\n. "{SCRIPTS}/_setup.sh"\nZV_PY="{sys.executable}"\n{snippet}'
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON")}
    return subprocess.run(
        ["/bin/bash", "-c", script, "_", *args],
        cwd=cwd,
        env={**base, "PATH": path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the platform and the prerequisites, within the first seconds ---


def _active_env(**extra: str) -> dict[str, str]:
    """This process's environment with its virtual environment active (torch installed: no disk check)
    and DeepSpeed's op not built (an empty TORCH_EXTENSIONS_DIR: the suite's own training runs may have
    built it in the environment already, which would skip the compiler check)."""
    venv = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "CXX", "TORCH_EXTENSIONS_DIR")}
    unbuilt = tempfile.mkdtemp(prefix="zv-no-ops-")
    return {
        **env,
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{venv}/bin:{os.environ['PATH']}",
        "TORCH_EXTENSIONS_DIR": unbuilt,
        **extra,
    }


def _prereqs(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``zv_prereqs ARGS`` after sourcing scripts/_setup.sh, in this process's active environment."""
    script = f'set -euo pipefail\nZV_NAME=t\n. "{SCRIPTS}/_setup.sh"\nzv_prereqs "$@"\necho checked'
    return subprocess.run(["/bin/bash", "-c", script, "_", *args], cwd=REPO, env=_active_env(**env),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_a_machine_with_what_the_commands_need_passes_the_check():
    proc = _prereqs()
    assert proc.returncode == 0 and proc.stdout.strip() == "checked", proc.stderr


def test_a_missing_compiler_is_named_with_its_install_commands():
    proc = _prereqs(CXX="zv-no-such-compiler")
    assert proc.returncode == 1 and "checked" not in proc.stdout
    assert "missing, before anything is installed or run:" in proc.stderr
    assert "a C++ compiler ('zv-no-such-compiler'; DeepSpeed builds its CPU op with it)" in proc.stderr
    assert "Debian/Ubuntu: sudo apt-get install g++; Fedora: sudo dnf install gcc-c++" in proc.stderr


def test_missing_python_headers_are_named_with_their_install_commands(tmp_path):
    compiler = _script(tmp_path / "c++", "exit 1\n")  # a compiler that finds no Python.h
    proc = _prereqs(CXX=str(compiler))
    short = "{}.{}".format(*sys.version_info[:2])
    assert proc.returncode == 1
    assert f"the Python {short} headers (Python.h in " in proc.stderr
    assert f"Debian/Ubuntu: sudo apt-get install python{short}-dev g++" in proc.stderr
    assert f"Fedora: sudo dnf install python{short}-devel gcc-c++" in proc.stderr


def test_a_built_cpu_op_needs_no_compiler(tmp_path):
    op = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    op.parent.mkdir()
    op.touch()
    proc = _prereqs(CXX="zv-no-such-compiler", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr


def test_too_little_disk_for_the_install_is_named_with_the_cpu_only_wheels(tmp_path):
    venv = tmp_path / "venv"  # an environment without torch: the install is still to come
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    proc = _prereqs(VIRTUAL_ENV=str(venv), ZOOMVIT_INSTALL_GB="100000")
    assert proc.returncode == 1
    assert f"disk space: the install needs about 100000 GB free in {tmp_path}, which has " in proc.stderr
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in proc.stderr


def test_a_port_another_program_holds_is_named_and_an_mlflow_already_there_is_not():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _prereqs(str(port))
    assert proc.returncode == 1
    assert f"a free port for MLflow: {port} on 127.0.0.1 is taken by another program" in proc.stderr
    assert "MLFLOW_PORT=5001" in proc.stderr
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert _prereqs(str(port)).returncode == 0


def test_each_missing_piece_is_named_at_once(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        proc = _prereqs(str(held.getsockname()[1]), CXX="zv-no-such-compiler")
    assert proc.returncode == 1
    assert proc.stderr.count("\n  - ") == 2, proc.stderr


@pytest.mark.parametrize("script", ["demo.sh", "test.sh"])
def test_on_macos_the_commands_say_in_their_first_second_that_they_need_linux(fakebin, script):
    fakebin.add("uname", "echo Darwin\n")
    started = time.monotonic()
    proc = subprocess.run(["bash", f"scripts/{script}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_active_env(PATH=f"{fakebin.path}:{os.environ['PATH']}"))  # fmt: skip
    assert time.monotonic() - started < 1.5
    assert proc.returncode == 1 and proc.stdout == ""
    assert "this needs Linux" in proc.stderr and "machine runs Darwin" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["demo.sh", "test.sh"])
def test_a_missing_compiler_stops_the_commands_within_seconds_before_any_install(script):
    started = time.monotonic()
    proc = subprocess.run(["bash", f"scripts/{script}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_active_env(CXX="zv-no-such-compiler"))  # fmt: skip
    assert time.monotonic() - started < 10
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sudo apt-get install g++" in proc.stderr and "sudo dnf install gcc-c++" in proc.stderr
    assert "using the active virtual environment" not in proc.stdout, "stopped before the set-up"


def test_the_set_up_runs_no_sudo_package_manager_curl_or_setsid(fakebin):
    for name in ("sudo", "apt-get", "apt", "dnf", "yum", "brew", "curl", "setsid"):
        fakebin.logged(name)
    env = _active_env(ZOOMVIT_SETUP_ONLY="1")
    env["PATH"] = f"{fakebin.path}:{env['PATH']}"
    proc = subprocess.run(["bash", "scripts/test.sh", "-m", "browser"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert fakebin.calls.read_text() == ""
    for path in [*SCRIPTS.glob("*.sh"), REPO / "mlflow/serve.sh"]:  # the daemons too (Python does both)
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        for word in ("curl", "setsid"):
            assert not re.search(rf"(^|[\s;&|(]){word}\s", code, re.M), f"{path.name} runs {word}"


def test_mlflow_serve_sh_names_a_port_another_program_holds_and_starts_nothing(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = _active_env(MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), MLFLOW_STATE_DIR=str(tmp_path))
        proc = subprocess.run(["bash", "mlflow/serve.sh", "--daemon"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken by another program" in proc.stderr and "MLFLOW_PORT" in proc.stderr
    assert not (tmp_path / "server.pid").exists()


# --- the browser test: selected by its marker, with whatever Chromium Playwright can launch ---


def test_the_browser_test_is_selected_by_its_marker():
    """``-m browser`` selects it (and ``-m "not browser"`` leaves it out): the one test marked so, with the
    marker registered (the suite runs with --strict-markers)."""
    import ast
    import tomllib

    marked = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                ast.unparse(d) in ("pytest.mark.browser", "mark.browser") for d in node.decorator_list
            ):
                marked.append(f"tests/{path.name}::{node.name}")
    assert marked == [BROWSER_TEST]
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("browser: ") for m in markers)


class _Chromium:
    """Playwright's ``chromium`` launcher as seen by ``launchable_chromium``: records what it was asked to
    launch; ``starts`` are the launch options that give a browser."""

    def __init__(self, starts):
        self.starts, self.tried = starts, []

    def launch(self, args, timeout, **options):
        self.tried.append(options)
        if options not in self.starts:
            raise RuntimeError("Executable doesn't exist")
        return type("Browser", (), {"close": lambda self: None})()


@pytest.mark.parametrize("starts", ["playwright's", "chromium-browser", "none"])
def test_the_browser_test_takes_playwrights_chromium_else_a_system_one_else_none(fakebin, monkeypatch, starts):
    from test_pipeline_e2e import launchable_chromium

    for name in ("chromium-browser", "google-chrome"):  # system ones on PATH under two of the common names
        fakebin.add(name, "exit 1\n")
    monkeypatch.setenv("PATH", str(fakebin.path))
    options = {"playwright's": {}, "chromium-browser": {"executable_path": str(fakebin.path / starts)}, "none": None}
    chromium = _Chromium([options[starts]])
    assert launchable_chromium(type("Playwright", (), {"chromium": chromium})()) == options[starts]
    tried = [o.get("executable_path") for o in chromium.tried]
    everything = [None, str(fakebin.path / "chromium-browser"), str(fakebin.path / "google-chrome")]
    assert tried == everything[: {"playwright's": 1, "chromium-browser": 2, "none": 3}[starts]]


# --- the environment: .venv when none is active, Python >= 3.11 ---


def test_with_no_virtual_environment_active_test_sh_creates_dot_venv_and_installs_into_it(tmp_path):
    """The real scripts/test.sh on a copy of the checkout's set-up files: it creates .venv there and
    runs pip from it; pip finds no index (PIP_NO_INDEX), so the install fails, with a clear message."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("test.sh", "_setup.sh", "_missing_deps.py"):
        shutil.copy(SCRIPTS / name, repo / "scripts" / name)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    base_python = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "PYTHONPATH")}
    env.update(
        PATH=f"{base_python.parent}:/usr/bin:/bin",  # no virtual environment's bin/ on it
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        ZOOMVIT_SETUP_ONLY="1",
    )
    proc = subprocess.run(["bash", "scripts/test.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    venv = repo / ".venv"
    assert (venv / "bin/python").exists() and (venv / "bin/pip").exists(), proc.stdout + proc.stderr
    assert f"no virtual environment active: creating {venv} with " in proc.stdout
    assert f"using a new virtual environment: {venv} (Python 3." in proc.stdout
    assert f"missing or out of range in {venv}:" in proc.stdout
    assert "jsonschema>=4.18 (not installed)" in proc.stdout, "the dev extra is checked, jsonschema included"
    assert "installing: pip install -e '.[dev]'" in proc.stdout
    assert proc.returncode != 0 and "pip install -e '.[dev]' failed" in proc.stderr
    assert "not running pytest" not in proc.stdout


def test_an_active_virtual_environment_is_used_and_nothing_is_reinstalled():
    venv = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv}/bin:{os.environ['PATH']}", ZOOMVIT_SETUP_ONLY="1")
    proc = subprocess.run(
        ["bash", "scripts/test.sh", "-m", "not slow", "tests/test_decode.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"using the active virtual environment: {venv}" in proc.stdout
    assert "installed: the package and its dev extra" in proc.stdout
    assert "not running pytest" in proc.stdout and "passed" not in proc.stdout


@pytest.mark.parametrize("given", [None, "/elsewhere/extensions"])
def test_torch_extensions_are_built_inside_the_environment_unless_a_place_is_given(given):
    """DeepSpeed's CPU op is JIT-built; in the cache every environment shares, two environments (or two
    ninja versions) rebuild it in turn (docs/development.md, "Pitfalls")."""
    venv = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TORCH_EXTENSIONS_DIR")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv}/bin:{os.environ['PATH']}")
    if given:
        env["TORCH_EXTENSIONS_DIR"] = given
    proc = subprocess.run(["bash", "-c", ". scripts/_setup.sh && zv_venv >/dev/null && echo \"$TORCH_EXTENSIONS_DIR\""],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (given or f"{venv}/torch_extensions")


def test_a_python_older_than_3_11_is_refused_with_a_clear_message(tmp_path):
    old = _script(tmp_path / "python3.9", "echo 3.9.2\n")
    proc = _setup("zv_base_python", path="/usr/bin:/bin", env={"PYTHON": str(old)})
    assert proc.returncode == 1
    assert f"ZoomViT needs Python >= 3.11 to create .venv, and found none: {old} is Python 3.9.2" in proc.stderr
    assert "Install Python 3.11 or newer" in proc.stderr

    venv = tmp_path / "oldvenv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(old, venv / "bin/python")
    proc = _setup("zv_venv", path="/usr/bin:/bin", env={"VIRTUAL_ENV": str(venv)})
    assert proc.returncode == 1 and f"{venv} has Python 3.9.2; ZoomViT needs Python >= 3.11" in proc.stderr


@pytest.mark.parametrize("version, ok", [("3.11.0", True), ("3.12.1", True), ("4.0.0", True), ("3.10.14", False)])
def test_the_version_check(version, ok):
    proc = _setup(f"zv_version_ok {version}", path="/usr/bin:/bin")
    assert (proc.returncode == 0) is ok


# --- what counts as installed: every requirement of pyproject.toml's dependencies and dev extra ---


def test_every_requirement_of_the_dependencies_and_the_extra_is_checked(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "zoomvit"\nversion = "0"\ndependencies = ["pytest>=8", "pytest>=999"]\n'
        '[project.optional-dependencies]\ndev = ["jsonschema>=4.18", "surely-not-a-package-zv>=1"]\n'
    )
    problems = _missing_deps.missing(tmp_path, ["dev"])
    assert any(p.startswith("pytest>=999 (found ") for p in problems), problems
    assert "surely-not-a-package-zv>=1 (not installed)" in problems
    assert not any(p.startswith(("pytest>=8", "jsonschema")) for p in problems), problems
    # this environment's zoomvit is the real checkout's: for another checkout it counts as missing
    assert any(p.startswith("zoomvit (installed from ") and str(tmp_path) in p for p in problems), problems
    assert not any("surely-not" in p for p in _missing_deps.missing(tmp_path, []))  # extras only when asked


def test_this_environment_has_every_dev_dependency():
    assert _missing_deps.missing(REPO, ["dev"]) == []


# --- demo.sh: the cluster it found, the environment's python3 ---


def test_demo_sh_submits_to_the_dashboard_of_the_cluster_it_found():
    demo = (SCRIPTS / "demo.sh").read_text()
    assert "127.0.0.1:8265" not in demo
    assert 'ray job submit --address "$dashboard"' in demo
    assert "python3 -m zoomvit runtime-env" in demo and '--runtime-env-json "$runtime_env"' in demo, "the commit"
    # python3: what a virtual environment and a stock Debian both have
    assert re.search(r"^\s*-- python3 pipelines/full\.py", demo, re.M)
    assert not re.search(r"(^|[\s;(])python\s", demo), "no bare `python`"
    (line,) = re.findall(r"^dashboard=\$\((python3 -c '[^']*')", demo, re.M)
    # where the cluster was found through $RAY_ADDRESS, its dashboard address is used (no cluster needed here)
    proc = subprocess.run(
        ["bash", "-c", line],
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "RAY_ADDRESS": "http://10.1.2.3:8265",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip().splitlines()[-1] == "http://10.1.2.3:8265", proc.stderr


@pytest.mark.parametrize("script", ["test.sh", "demo.sh", "_setup.sh"])
def test_the_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(SCRIPTS / script)]).returncode == 0
