"""The tree stays as `ruff` (configured in pyproject.toml) wants it: lint rules and formatting."""

import subprocess
import sys

from conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
    assert "No module named ruff" not in proc.stderr, "ruff is not installed: pip install -e '.[dev]'"
    return proc


def test_ruff_finds_nothing_to_lint():
    proc = _ruff("check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_ruff_finds_nothing_to_reformat():
    proc = _ruff("format", "--check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:]
