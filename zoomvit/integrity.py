"""Content hashes of committed outputs, and the check a cached output passes before it is trusted.

A stage's manifest records, for every output it lists, the size and the sha256 of its content (a
listed directory: of every file inside). A cache hit re-checks both: sizes first (cheap: they catch
a truncated or partial copy without reading anything), then the content, which catches what sizes
cannot (a flipped byte, a file rewritten to the same length). Manifests written before hashes were
recorded are checked by size alone.

Hashing streams the file in 4 MiB chunks and is memoised per (path, size, mtime, ctime, inode) within
one process, so a file checked twice in one run (the plan, then the check under the output's lock) is
read once; a rewrite, even one that restores the mtime, changes the ctime and is hashed again.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CHUNK = 4 << 20
PREFIX = "sha256:"


@functools.lru_cache(maxsize=16384)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return PREFIX + h.hexdigest()


def content_hash(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a local file's content (memoised within the process while its stat is unchanged)."""
    st = os.stat(path)
    return _sha256(os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class ContentMismatch(ValueError):
    """A file's content is not what was committed."""


def mismatch(path: Path, recorded: Any) -> str | None:
    """Why ``path``'s content differs from its ``recorded`` hash, or None (also when nothing usable was recorded)."""
    if not (isinstance(recorded, str) and recorded.startswith(PREFIX)):
        return None
    got = content_hash(path)
    if got == recorded:
        return None
    now, then = got[len(PREFIX) :][:12], recorded[len(PREFIX) :][:12]
    return f"does not match the content hash recorded when it was committed (sha256 {now}, {then} then)"


def check_content(path: Path, recorded: Any) -> None:
    """Raise :class:`ContentMismatch` naming ``path`` when its content differs from its ``recorded`` hash."""
    if (why := mismatch(path, recorded)) is not None:
        raise ContentMismatch(f"{path.name} {why}")


def _files_inside(directory: Path, skip: frozenset[str]) -> Iterator[Path]:
    """Every regular file under ``directory``, sorted; hidden files (the temporaries of
    :mod:`zoomvit.durable`) and the names in ``skip`` (the stage's own manifest) left out."""
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in skip:
            yield path


def record(files: Mapping[str, Path], *, skip: frozenset[str] = frozenset()) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(sizes, hashes)`` of a stage's listed outputs (key -> path), as its manifest records them at
    commit. A listed file: its size and hash; a listed directory: ``{relative path: size}`` and
    ``{relative path: hash}`` of every file inside it (``skip``: names relative to it to leave out)."""
    sizes: dict[str, Any] = {}
    hashes: dict[str, Any] = {}
    for key, path in files.items():
        if path.is_file():
            sizes[key], hashes[key] = path.stat().st_size, content_hash(path)
        elif path.is_dir():
            inside = list(_files_inside(path, skip))
            sizes[key] = {p.relative_to(path).as_posix(): p.stat().st_size for p in inside}
            hashes[key] = {p.relative_to(path).as_posix(): content_hash(p) for p in inside}
    return sizes, hashes


def _recorded(path: Path, size: Any, digest: Any) -> Iterator[tuple[Path, Any, Any]]:
    """The files an output's record names, with the size and hash recorded for each (None: not
    recorded). A directory recorded before hashes were (no per-file record) names none."""
    if not path.is_dir():
        yield path, size, digest
        return
    sizes = size if isinstance(size, dict) else {}
    digests = digest if isinstance(digest, dict) else {}
    for rel in sorted({*sizes, *digests}):
        yield path / rel, sizes.get(rel), digests.get(rel)


def damaged(outputs: Mapping[str, tuple[Path, Any, Any]]) -> str | None:
    """Why one of a cached stage's outputs differs from what was committed, or None. ``outputs``:
    key -> (path, recorded size, recorded hash), either recorded value possibly absent (an older manifest).
    Every existence and size is checked before any content is read."""
    for key, (path, size, digest) in outputs.items():
        if not path.exists():
            return f"its {key} file {path} is missing"
        for file, want_size, _ in _recorded(path, size, digest):
            if not file.is_file():
                return f"its {key} file {file} is missing"
            if isinstance(want_size, int) and file.stat().st_size != want_size:
                return f"its {key} file {file} has {file.stat().st_size} bytes, {want_size} when committed"
    for key, (path, size, digest) in outputs.items():
        for file, _, want in _recorded(path, size, digest):
            if (why := mismatch(file, want)) is not None:
                return f"its {key} file {file} {why}"
    return None
