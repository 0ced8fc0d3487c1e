"""The suite leaves a Ray it did not start alone. A head started before the tests that start and stop
clusters of their own (``own_ray``; here just before the first of them, on its own port and temp dir, as
a user's Ray would be) still answers ``ray status`` after the last of them; and stopping a cluster by its
own processes (``zoomvit.own_ray``, what the tests and ``scripts/local_cluster.sh down`` use) ends
that cluster's processes and their descendants, and nothing else."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from servers import ray_env, ray_head, ray_temp_dir

from zoomvit.own_ray import processes, stop


def _status(head: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ray", "status", "--address", head["gcs"]], env=head["env"], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="session")
def bystander():
    """A Ray head no test owns: no CPUs, no dashboard; stopped at the end of the session."""
    with ray_head(num_cpus=0, dashboard=False, env=ray_env()) as head:
        yield head


@pytest.mark.slow
@pytest.mark.own_ray(first=True)
def test_a_ray_started_before_the_clusters_of_the_tests_answers_ray_status(bystander):
    status = _status(bystander)
    assert status.returncode == 0, status.stdout + status.stderr
    assert processes([bystander["temp_dir"]]), "its processes name its temp dir"


@pytest.mark.slow
@pytest.mark.own_ray(last=True)
def test_a_ray_started_before_the_clusters_of_the_tests_still_answers_ray_status_after_them(bystander):
    status = _status(bystander)
    assert status.returncode == 0, "the Ray started before the tests was stopped:\n" + status.stdout + status.stderr


def _sleeper(*args: str) -> subprocess.Popen:
    """A process with ``args`` on its command line and a child of its own (as a raylet has workers), in a
    process group of its own (what the test's clean-up ends)."""
    child = "import time; time.sleep(120)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)


def test_stopping_a_cluster_by_its_temp_dir_ends_its_processes_and_their_children_and_nothing_else():
    mine, other = ray_temp_dir(), ray_temp_dir()
    procs = [
        _sleeper(f"--temp-dir={mine}"),
        _sleeper(f"--session-dir={mine}/session_latest"),
        _sleeper("--logs-dir", f"{mine}/session_latest/logs"),
        _sleeper(f"--temp-dir={other}"),
        _sleeper(f"--temp-dir={mine}-not-it"),  # a longer name that starts with the same characters
        _sleeper(mine),  # not an option's value: a command that merely mentions the path
    ]
    try:
        deadline = time.monotonic() + 20
        while len(processes([mine])) < 6 and time.monotonic() < deadline:  # three processes and their children
            time.sleep(0.1)
        found = processes([mine])
        assert {p.pid for p in procs[:3]} <= set(found) and len(found) == 6, found
        assert stop([mine], grace_s=5) == found
        for proc in procs[:3]:
            proc.wait(timeout=10)
        assert processes([mine]) == [], "their children too"
        assert all(p.poll() is None for p in procs[3:]), "only the processes of that temp dir are stopped"
        assert procs[3].pid in processes([other])
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for path in (mine, other):
            shutil.rmtree(path, ignore_errors=True)
