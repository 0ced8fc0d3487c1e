"""The two commands' set-up (scripts/_setup.sh and its two Python helpers): which environment, what is
installed, and Chromium only for the browser test. No network, no Ray: apt-get, sudo and id are fakes
on a PATH of their own where a branch needs them; the one test that creates a virtual environment
stops at pip, which has no index to install from."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BROWSER_TEST = (
    "tests/test_pipeline_e2e.py::test_the_mlflow_ui_shows_runs_figures_models_and_a_comparison_in_headless_chromium"
)
sys.path.insert(0, str(SCRIPTS))
import _missing_deps  # noqa: E402
import _selects_browser  # noqa: E402

sys.path.remove(str(SCRIPTS))


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakebin(tmp_path):
    """A PATH holding only what a branch is given: ``add('apt-get')`` etc. Calls are logged."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    (bin_ / "env").symlink_to(shutil.which("env"))
    _script(bin_ / "id", 'echo "${FAKE_UID:-0}"\n')
    fakes = {
        # installing chromium puts a 'chromium' on this PATH, as Debian's package does on /usr/bin
        "apt-get": f'echo "apt-get $*" >>"{log}"\n'
        f'case "$*" in *install*chromium*)\n'
        f'  printf "#!/bin/sh\\n" >"{bin_}/chromium"; /bin/chmod +x "{bin_}/chromium";;\nesac\n',
        "sudo": f'echo "sudo $*" >>"{log}"\n[ "$1" = -n ] && shift\nexec "$@"\n',
    }

    class Bin:
        path = bin_
        calls = log

        def add(self, name: str) -> None:
            _script(bin_ / name, fakes[name])

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


# --- Chromium: only for the browser test, never a crash ---


def test_chromium_is_not_installed_when_the_browser_test_is_not_selected(fakebin):
    fakebin.add("apt-get")
    proc = _setup('zv_chromium "$@"', "-m", "not slow", "tests/test_decode.py", path=str(fakebin.path))
    assert proc.returncode == 0, proc.stderr
    assert "not installing chromium: the browser test is not selected" in proc.stdout
    assert fakebin.calls.read_text() == "", "apt-get was not run"


def test_chromium_is_installed_as_root_when_the_whole_suite_runs(fakebin):
    fakebin.add("apt-get")
    proc = _setup('zv_chromium "$@"', path=str(fakebin.path))  # no arguments: the whole suite
    assert proc.returncode == 0, proc.stderr
    assert f"for the browser test: {BROWSER_TEST}" in proc.stdout
    assert f"chromium installed: {fakebin.path}/chromium" in proc.stdout
    calls = fakebin.calls.read_text().splitlines()
    assert calls[0] == "apt-get update -qq" and calls[-1] == "apt-get install -y -qq chromium", calls


def test_chromium_is_installed_through_sudo_when_not_root(fakebin):
    fakebin.add("apt-get")
    fakebin.add("sudo")
    proc = _setup('zv_chromium "$@"', BROWSER_TEST, path=str(fakebin.path), env={"FAKE_UID": "1000"})
    assert proc.returncode == 0, proc.stderr
    calls = fakebin.calls.read_text().splitlines()
    # no terminal here: sudo -n, which fails rather than waits for a password
    assert "sudo -n apt-get update -qq" in calls and "apt-get install -y -qq chromium" in calls, calls


@pytest.mark.parametrize(
    "have, uid, why",
    [(["apt-get"], "1000", "not root, and no sudo"), ([], "0", "no apt-get here")],
)
def test_where_chromium_cannot_be_installed_a_message_says_so_and_the_script_goes_on(fakebin, have, uid, why):
    for name in have:
        fakebin.add(name)
    proc = _setup('zv_chromium "$@"; echo went-on', "-m", "slow", path=str(fakebin.path), env={"FAKE_UID": uid})
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("went-on"), proc.stderr
    assert f"could not install chromium ({why}): the browser test will be skipped" in proc.stderr
    assert "apt-get install chromium" in proc.stderr, "says how to install it"
    assert fakebin.calls.read_text() == ""


def test_the_browser_test_skips_itself_with_a_reason_when_chromium_is_absent():
    source = (REPO / "tests/test_pipeline_e2e.py").read_text()
    assert re.search(r'CHROMIUM = shutil\.which\("chromium"\)', source)
    assert re.search(r"@pytest\.mark\.skipif\(\s*CHROMIUM is None,\s*reason=", source)
    assert "executable_path=CHROMIUM" in source and "/usr/bin/chromium" not in source


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], True),
        (["-m", "not slow"], False),
        (["-m", "slow"], True),
        (["tests/test_decode.py", "-k", "label"], False),
        (["tests/test_pipeline_e2e.py"], True),
        (["tests/test_pipeline_e2e.py::test_a_failing_stage_fails_the_parent_and_keeps_the_upstream_cache"], False),
        ([BROWSER_TEST], True),
        (["-k", "chromium"], True),
        (["-k", "not mlflow_ui"], False),
        (["--timeout", "60", "-k", "e2e and ui"], True),
        (["--deselect", BROWSER_TEST], False),
        (["--ignore", "tests/test_pipeline_e2e.py"], False),
        (["--co"], False),
    ],
)
def test_which_arguments_select_the_browser_test(args, expected):
    yes, what = _selects_browser.selected(args, cwd=REPO)
    assert yes is expected, what
    if yes:
        assert what == BROWSER_TEST


def test_the_browser_test_is_found_in_the_sources_not_named():
    assert [t.nodeid for t in _selects_browser.browser_tests(REPO)] == [BROWSER_TEST]
    (test,) = _selects_browser.browser_tests(REPO)
    assert "slow" in test.marks  # the module's pytestmark: what -m "not slow" deselects


# --- the environment: .venv when none is active, Python >= 3.11 ---


def test_with_no_virtual_environment_active_test_sh_creates_dot_venv_and_installs_into_it(tmp_path):
    """The real scripts/test.sh on a copy of the checkout's set-up files: it creates .venv there and
    runs pip from it; pip finds no index (PIP_NO_INDEX), so the install fails, with a clear message."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("test.sh", "_setup.sh", "_missing_deps.py", "_selects_browser.py"):
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
