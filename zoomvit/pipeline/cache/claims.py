"""Who holds what in a bucket cache: claims to compute an entry (numbered: the number is the holder's
epoch), leases of runs reading an attempt, both renewed in the background while held and expired by
the store's clock when their holder stops renewing; the fence a holder's workers check before they
write; this machine's identity."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoomvit.data.shards import filesystem
from zoomvit.home import default_dir
from zoomvit.pipeline.cache.store import list_objects, mtime_of

log = logging.getLogger(__name__)

CLAIM_TTL_S = 120.0  # a claim not renewed for this long is its dead holder's; renewed every quarter of it
LEASE_TTL_S = 120.0  # the same for a read lease


class FencedOut(OSError):
    """The holder's claim was taken over by another driver: nothing it writes may reach the output."""


def claims(base: str) -> dict[int, dict[str, Any]]:
    """The claim objects under ``base`` by number (epoch)."""
    return {int(name.split(".")[0]): info for name, info in list_objects(base).items() if name.endswith(".json")}


def claim_state(path: str, info: dict[str, Any]) -> dict[str, Any]:
    """A claim's content, and whether it is free: released, or not renewed within :data:`CLAIM_TTL_S`."""
    try:
        state = json.loads(filesystem(path).cat_file(path))
    except (OSError, ValueError):
        state = {}
    expired = time.time() - mtime_of(info) > CLAIM_TTL_S
    return {**state, "free": bool(state.get("released")) or expired}


def live_leases(base: str) -> dict[str, list[str]]:
    """The attempts that runs read now (leases renewed within :data:`LEASE_TTL_S`): attempt -> holders."""
    fs, now = filesystem(base), time.time()
    out: dict[str, list[str]] = {}
    for name, info in list_objects(base).items():
        if now - mtime_of(info) > LEASE_TTL_S:
            continue
        try:
            lease = json.loads(fs.cat_file(f"{base}/{name}"))
        except (OSError, ValueError):
            continue  # released meanwhile
        out.setdefault(lease["attempt"], []).append(lease.get("holder", "?"))
    return out


@dataclass(frozen=True)
class Fence:
    """What a claim's holder checks before each write that outlives it (a checkpoint, a part, the
    commit): raises :class:`FencedOut` once a later epoch exists. Picklable: Ray Train's workers get it."""

    claims: str  # the entry's claims prefix
    epoch: int

    def __call__(self) -> None:
        if (latest := max(claims(self.claims), default=0)) > self.epoch:
            raise FencedOut(
                f"{self.claims}: this run's claim (epoch {self.epoch}) was taken over by epoch {latest}; "
                "it stops without writing into the output"
            )


class _Renewed:
    """An object in the store that its holder rewrites every quarter of ``ttl`` while held."""

    ttl = 120.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._stop = threading.Event()
        self._renewed = time.monotonic()
        self._thread: threading.Thread | None = None

    def payload(self) -> bytes:
        raise NotImplementedError

    def __enter__(self):
        self._thread = threading.Thread(target=self._renew, name=f"zoomvit-{type(self).__name__}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()

    def release(self) -> None:
        raise NotImplementedError

    def lost(self) -> bool:
        return False

    def _renew(self) -> None:
        fs = filesystem(self.path)
        while not self._stop.wait(self.ttl / 4):
            try:
                if self.lost():
                    log.warning(f"[cache] {self.path}: taken over by another driver")
                    return
                fs.pipe_file(self.path, self.payload())
                self._renewed = time.monotonic()
            except OSError as err:
                log.warning(f"[cache] could not renew {self.path} ({err}); retrying")


class Claim(_Renewed):
    """A held claim on a cache entry: renewed while held, marked released on exit. Its number is its
    epoch (:attr:`fence`). :meth:`check` before committing: the claim must still be this driver's."""

    def __init__(self, path: str, holder: str, lock: str | None = None) -> None:
        super().__init__(path)
        self.ttl = CLAIM_TTL_S
        self.holder, self.lock, self.token = holder, lock, uuid.uuid4().hex
        base, name = path.rsplit("/", 1)
        self.fence = Fence(base, int(name.split(".")[0]))

    @property
    def epoch(self) -> int:
        return self.fence.epoch

    def payload(self, *, released: bool = False) -> bytes:
        me = {"holder": self.holder, **host_identity(), "lock": self.lock, "pid": os.getpid(), "token": self.token}
        return json.dumps({**me, "released": released}).encode()

    def release(self) -> None:
        """Mark the claim released (unless another driver took it over): free at once for the next."""
        try:
            if not self.lost():
                filesystem(self.path).pipe_file(self.path, self.payload(released=True))
        except OSError as err:  # the claim then expires by itself
            log.warning(f"[cache] could not release {self.path} ({err}); it expires in {CLAIM_TTL_S:.0f} s")

    def lost(self) -> bool:
        """Whether another driver holds a later claim on the entry (it took this one over)."""
        return max(claims(self.fence.claims), default=0) > self.epoch

    def check(self) -> None:
        """Raise :class:`FencedOut` when this claim may no longer be this driver's: another took it over,
        or it could not be renewed for most of its lifetime (a storage outage)."""
        self.fence()
        if (stale := time.monotonic() - self._renewed) > 0.75 * CLAIM_TTL_S:
            raise FencedOut(f"{self.path}: not renewed for {stale:.0f} s; another driver may have taken it over")


class Lease(_Renewed):
    """A run's read lease on one committed attempt: while it is renewed, no commit deletes the attempt."""

    def __init__(self, base: str, attempt: str, holder: str) -> None:
        super().__init__(f"{base}/{uuid.uuid4().hex}.json")
        self.ttl = LEASE_TTL_S
        self.attempt, self.holder = attempt, holder

    def payload(self) -> bytes:
        return json.dumps(
            {"attempt": self.attempt, "holder": self.holder, **host_identity(), "pid": os.getpid()}
        ).encode()

    def __enter__(self) -> Lease:
        filesystem(self.path).pipe_file(self.path, self.payload())
        return super().__enter__()

    def release(self) -> None:
        try:
            filesystem(self.path).rm(self.path)
        except OSError as err:  # it expires by itself
            log.warning(f"[cache] could not end the lease {self.path} ({err}); it expires in {LEASE_TTL_S:.0f} s")


def host_identity() -> dict[str, str]:
    """This machine as a claim names it: the hostname, the kernel's boot id and a token kept in this
    home (:func:`default_dir`), so two containers that share a hostname and a home path but not the
    home's files are two machines."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    token_file = default_dir() / "staging" / ".host-token"
    try:
        token = token_file.read_text().strip()
    except FileNotFoundError:
        token_file.parent.mkdir(parents=True, exist_ok=True)
        mine = token_file.with_name(f".host-token.{uuid.uuid4().hex}")
        mine.write_text(uuid.uuid4().hex)
        with contextlib.suppress(FileExistsError):
            os.link(mine, token_file)  # the first writer's token stands
        mine.unlink()
        token = token_file.read_text().strip()
    return {"host": socket.gethostname(), "boot_id": boot, "home_token": token}


def left_by_a_dead_driver_here(state: dict[str, Any], held_lock: str) -> bool:
    """A claim made on this machine under the staging lock this driver now holds exclusively: its
    holder is gone (its process too, where it is this machine's), so the claim is free at once."""
    here = host_identity()
    if any(state.get(key) != value for key, value in here.items()) or state.get("lock") != held_lock:
        return False
    pid = state.get("pid")
    return not isinstance(pid, int) or pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
