"""A Ray cluster of one's own on this machine, stopped by its own processes.

`ray stop` (with ``--force`` or not) stops every Ray process on the machine, whoever started it: a
user's cluster, the demo's, another checkout's tests. A cluster started with a temp dir of its own
(``ray start --temp-dir DIR``, or ``RAY_TMPDIR`` for a driver that starts its own local Ray) names
that dir on the command line of each of its processes (``--session-dir``, ``--logs-dir``,
``--temp-dir``, the raylet's socket names, on every node that joins it), and everything else it runs
(workers, job drivers, agents, the dashboard's modules) descends from those. :func:`stop` ends
exactly that set: SIGTERM, then SIGKILL for what is left after a grace period.

    python -m zoomvit.own_ray stop DIR [DIR...]     # what scripts/local_cluster.sh down runs
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def _table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from ``ps`` (Linux and macOS)."""
    out = subprocess.run(
        ["ps", "-A", "-ww", "-o", "pid=", "-o", "ppid=", "-o", "stat=", "-o", "args="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = (int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "")
    return table


def _names(args: str, roots: list[str]) -> bool:
    """Whether a command line passes a path in one of ``roots`` as an option's value
    (``--flag=PATH`` or ``--flag PATH``): how Ray's processes are told their temp and session dirs."""
    previous = ""
    for token in args.split():
        value = None
        if token.startswith("-") and "=" in token:
            value = token.split("=", 1)[1]
        elif previous.startswith("--") and "=" not in previous:
            value = token
        previous = token
        if value and any(value == root or value.startswith(root + "/") for root in roots):
            return True
    return False


def processes(temp_dirs: Iterable[str | Path]) -> list[int]:
    """The live processes of the clusters whose temp dirs are ``temp_dirs``: those naming one of them
    on their command line and all their descendants; never this process or its ancestors."""
    roots = [os.path.realpath(d).rstrip("/") for d in temp_dirs] + [str(d).rstrip("/") for d in temp_dirs]
    table = _table()
    mine, pid = set(), os.getpid()
    while pid in table and pid not in mine:  # this process and its ancestors: the caller's own
        mine.add(pid)
        pid = table[pid][0]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [pid for pid, (_, _, args) in table.items() if _names(args, roots)]
    while todo:
        pid = todo.pop()
        if pid in found or pid in mine:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return sorted(pid for pid in found if not table[pid][1].startswith("Z"))


def stop(temp_dirs: Iterable[str | Path], grace_s: float = 10.0) -> list[int]:
    """Stop the clusters whose temp dirs are ``temp_dirs`` (SIGTERM, then SIGKILL after ``grace_s``)
    and no other process; returns the pids it signalled. A dir no process names is a no-op."""
    temp_dirs = [str(d) for d in temp_dirs]
    pids = processes(temp_dirs)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        table = _table()
        left = [p for p in left if p in table and not table[p][1].startswith("Z")]
    # SIGKILL what is left, and whatever started in the meantime (a worker the raylet was starting)
    _signal(sorted(set(left) | set(processes(temp_dirs))), signal.SIGKILL)
    return pids


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoomvit.own_ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stop_parser = sub.add_parser("stop", help="stop the clusters with these temp dirs, and nothing else")
    stop_parser.add_argument("temp_dirs", nargs="+")
    stop_parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    pids = stop(args.temp_dirs, args.grace)
    print(f"stopped {len(pids)} process(es) of the Ray cluster(s) in {' '.join(args.temp_dirs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
