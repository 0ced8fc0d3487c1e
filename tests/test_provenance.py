"""Which commit a run records: the checkout's, the submitter's under `ray job submit`, or plainly none."""

import json
import subprocess
from pathlib import Path

import pytest

from zoomvit.cli import main
from zoomvit.provenance import COMMIT_ENV, DIRTY_ENV, checkout_source, resolve_source, submit_env


@pytest.fixture(autouse=True)
def _no_repository_above(tmp_path, monkeypatch):
    """git looks no further up than the test's own folder, wherever the temporary folders live."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for name in (COMMIT_ENV, DIRTY_ENV):
        monkeypatch.delenv(name, raising=False)


def _git(path: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, cwd=path, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "tracked.txt").write_text("one\n")
    _git(repo, "add", "tracked.txt")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


@pytest.fixture
def copy(tmp_path) -> Path:
    """What `ray job submit --working-dir` unpacks: the files, no .git."""
    plain = tmp_path / "job_copy"
    plain.mkdir()
    return plain


def test_a_checkout_gives_its_commit_and_whether_tracked_files_changed(checkout):
    head = _git(checkout, "rev-parse", "HEAD")
    clean = checkout_source(checkout)
    assert clean is not None and (clean.commit, clean.dirty, clean.origin) == (head, False, "checkout")
    (checkout / "untracked.txt").write_text("new\n")
    assert checkout_source(checkout).dirty is False, "an untracked file is not a change to the commit's code"
    (checkout / "tracked.txt").write_text("two\n")
    assert checkout_source(checkout).dirty is True
    tags = resolve_source({}, checkout).tags()
    assert tags == {"git_commit": head, "git_source": "checkout", "mlflow.source.git.commit": head, "git_dirty": "true"}


def test_a_submitted_job_records_the_submitters_commit_where_its_copy_has_no_git(checkout, copy):
    head = _git(checkout, "rev-parse", "HEAD")
    handed = submit_env(checkout)
    assert handed == {COMMIT_ENV: head, DIRTY_ENV: "false"}
    source = resolve_source(handed, copy)
    assert (source.commit, source.dirty, source.origin) == (head, False, "submitter")
    assert source.tags()["mlflow.source.git.commit"] == head
    assert resolve_source({COMMIT_ENV: head}, checkout).origin == "submitter", "what the submitter says wins"


def test_a_tree_without_git_says_so_plainly(copy):
    source = resolve_source({}, copy)
    assert source.commit is None and source.origin == "none"
    tags = source.tags()
    assert tags["git_commit"] == "none" and "mlflow.source.git.commit" not in tags
    assert tags["git_source"].startswith("no git:") and "zoomvit runtime-env" in tags["git_source"]
    assert submit_env(copy) == {COMMIT_ENV: "none"}
    submitted = resolve_source(submit_env(copy), copy).tags()
    assert submitted["git_commit"] == "none" and "submitting tree is not a git checkout" in submitted["git_source"]


def test_a_package_file_untracked_by_the_repository_around_it_is_not_that_repositorys_code(checkout, monkeypatch):
    """A virtual environment inside some checkout (ignored there): its installed package is no part of it."""
    installed = checkout / ".venv" / "site-packages" / "pkg"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    (checkout / ".gitignore").write_text(".venv/\n")
    assert checkout_source(installed) is not None, "any directory of the checkout names its commit"
    monkeypatch.setattr("zoomvit.provenance.PACKAGE_DIR", installed)
    assert checkout_source(installed) is None, "the package's own files must be tracked"


def test_the_runtime_env_command_prints_the_commit_and_the_given_env_vars(checkout, monkeypatch, capsys):
    monkeypatch.chdir(checkout)
    assert main(["runtime-env", "--env", "MLFLOW_TRACKING_URI=http://127.0.0.1:5000"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "env_vars": {
            COMMIT_ENV: _git(checkout, "rev-parse", "HEAD"),
            DIRTY_ENV: "false",
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        }
    }
    assert main(["runtime-env", "--env", "NOVALUE"]) == 2
