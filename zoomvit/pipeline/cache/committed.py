"""Whether a stage's output is committed: the one answer, for a directory and for a bucket entry.

An output is committed once its manifest, written last, is there; it is intact while every file (a
bucket: object) the manifest lists still has the size and content it had at commit. The plan, the
recheck under a lock, the bucket's claim and publish, and the writers that replace an output all ask
:func:`committed_output`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoomvit.data.shards import filesystem, is_url
from zoomvit.integrity import damaged
from zoomvit.pipeline.cache.store import checksum_mismatch, damage, entry_of

MANIFEST = "manifest.json"


def committed_output(location: Path | str, fingerprint: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` for an intact committed output (a local directory or a bucket entry),
    ``(None, why)`` for a damaged one (or, with ``fingerprint``, one committed for another fingerprint),
    ``(None, None)`` when none is committed there. A local output is checked by its files' sizes and
    content hashes (a manifest from before hashes were recorded: sizes alone), a bucket entry by one
    listing (sizes and ETags) and the checksums the store kept."""
    manifest, why = written_manifest(location)
    if manifest is None:
        return None, why
    why = _bucket_damage(manifest) if is_url(str(location)) else _local_damage(Path(location), manifest)
    if why is None and fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        why = f"it holds the output of fingerprint {manifest.get('fingerprint')}, not {fingerprint}"
    return (None, why) if why else (manifest, None)


def location_of(out_dir: str) -> Path | str:
    """A committed output's location from its manifest's ``out_dir``: a directory, or a bucket entry
    (an attempt's prefix names its entry)."""
    return entry_of(out_dir) if is_url(out_dir) else Path(out_dir)


def written_manifest(location: Path | str) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest at ``location`` as written, unchecked: ``(None, why)`` when it cannot be read,
    ``(None, None)`` when there is none. Whether the output stands is :func:`committed_output`'s answer."""
    try:
        if is_url(str(location)):
            text = filesystem(str(location)).cat_file(f"{location}/{MANIFEST}")
        else:
            text = (Path(location) / MANIFEST).read_bytes()
        return json.loads(text), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{MANIFEST} is unreadable ({err})"


def _local_damage(out_dir: Path, manifest: dict[str, Any]) -> str | None:
    try:
        files, sizes, hashes = (manifest.get(k, {}) for k in ("files", "file_sizes", "file_hashes"))
        base = Path(manifest.get("out_dir", out_dir))
        outputs = {key: (base / rel, sizes.get(key), hashes.get(key)) for key, rel in files.items()}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    try:
        return damaged(outputs)
    except OSError as err:
        return f"a listed file cannot be read ({err})"


def _bucket_damage(manifest: dict[str, Any]) -> str | None:
    try:
        return damage(manifest) or checksum_mismatch(manifest)
    except (KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
