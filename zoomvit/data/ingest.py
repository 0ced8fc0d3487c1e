"""WebDataset shards on Ray Data, with per-sample error handling.

Ray's ``read_webdataset`` fails the whole read on a truncated tar, a repeated member name or a
sample split across the archive, and decodes labels itself. ``WebDatasetShards`` is the same
file-based datasource reading raw members through :func:`iter_tar_samples`, so every sample becomes
one row and every problem becomes a counted skip row rather than an exception:

    kind = "sample": raw image bytes + label bytes + json bytes
    kind = "error":  a problem found while reading (truncated shard, duplicate key, ...)
    kind = "eos":    the shard is finished; ``count`` rows were emitted before it

Decoding runs in ``map_batches`` (:func:`decode_batch`), keeping the same three kinds, so a
consumer can tell when all rows of a shard have arrived and commit work shard by shard.

An I/O error mid-shard (a flaky object-store read) is not a skip: the shard is reopened and read
again from the start with backoff, the rows already emitted are not emitted twice, and after the
last attempt the read fails with :class:`ShardReadError` naming the shard, so no consumer ever sees
that shard's end-of-shard row (nothing built from it is committed).

A tar cut short (mid-member, or at a member boundary: it then lacks the end-of-archive block) ends
with a ``truncated_shard`` skip. When the ``_info.json`` beside the shards gives a shard's sample
count (:func:`zoomvit.data.shards.expected_samples`), the samples read through to the end of the tar
(counted skips included: a bad sample is still a sample; the truncation marker is not) must equal
it, or the read fails with :class:`IncompleteShard` naming the shard and both counts, before its
end-of-shard row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np
import pyarrow as pa

from zoomvit.data.decode import (
    ERROR_FIELD,
    IMAGE_EXTENSIONS,
    DuplicateKeyFilter,
    ImageTransform,
    SkipReason,
    decode_sample,
    iter_tar_samples,
)
from zoomvit.data.shards import expected_samples, shard_key

RAW_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int64()),
        ("image", pa.binary()),
        ("ext", pa.string()),
        ("cls", pa.binary()),
        ("json", pa.binary()),
        ("reason", pa.string()),
        ("count", pa.int64()),
    ]
)
_CHUNK_ROWS = 64
READ_RETRIES = 4
READ_BACKOFF_S = 0.5
log = logging.getLogger(__name__)


class ShardReadError(RuntimeError):
    """A shard could not be read to its end, even after retries."""


class IncompleteShard(ShardReadError):
    """A shard read to its end holds another number of samples than its ``_info.json`` says."""


# skip rows that stand for the unreadable rest of a tar, not for one of its samples
_END_MARKERS = frozenset({SkipReason.truncated_shard.value, SkipReason.read_error.value})


def _raw_row(kind: str, key: str, shard: str, index: int, **fields: Any) -> dict[str, Any]:
    row = dict.fromkeys(RAW_SCHEMA.names)
    row.update(kind=kind, key=key, shard=shard, index=index, **fields)
    return row


def raw_rows(
    stream: IO[bytes],
    shard: str,
    *,
    reopen: Callable[[], IO[bytes]] | None = None,
    retries: int = READ_RETRIES,
    backoff_s: float = READ_BACKOFF_S,
    expected: int | None = None,
) -> Iterator[dict[str, Any]]:
    """One raw row per sample of a tar stream, then the end-of-shard row. An ``OSError`` while reading
    reopens the shard (``reopen``) up to ``retries`` times, waiting ``backoff_s`` x 2^attempt, and
    resumes after the rows already yielded; then :class:`ShardReadError`. ``expected``: the shard's
    sample count from ``_info.json``; another count read to the end raises :class:`IncompleteShard`
    instead of the end-of-shard row (not retried: the tar itself is short or long)."""
    emitted = 0
    for attempt in range(retries + 1):
        try:
            for i, row in enumerate(_raw_rows_once(stream, shard, expected)):
                if i >= emitted:
                    emitted += 1
                    yield row
            return
        except OSError as exc:
            if reopen is None or attempt == retries:
                raise ShardReadError(
                    f"{shard}: read failed after {attempt + 1} attempt(s) ({type(exc).__name__}: {exc}); "
                    f"{emitted} rows were read, the shard's work is not committed"
                ) from exc
            wait = backoff_s * 2**attempt
            log.warning("%s: %s after %d rows; reading it again in %.1f s", shard, exc, emitted, wait)
            time.sleep(wait)
            stream = reopen()


def _raw_rows_once(stream: IO[bytes], shard: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    duplicates = DuplicateKeyFilter()
    index = 0
    ended_early = False
    for sample in iter_tar_samples(stream, url=shard):
        key = sample["__key__"]
        if ERROR_FIELD in sample:
            ended_early = ended_early or sample[ERROR_FIELD] in _END_MARKERS
            yield _raw_row("error", key, shard, index, reason=sample[ERROR_FIELD])
        elif duplicates.seen(key):
            yield _raw_row("error", key, shard, index, reason=SkipReason.duplicate_key.value)
        else:
            ext = next((e for e in sample if e.lower() in IMAGE_EXTENSIONS), None)
            yield _raw_row(
                "sample",
                key,
                shard,
                index,
                image=None if ext is None else sample[ext],
                ext=ext,
                cls=_bytes_or_none(sample, "cls"),
                json=_bytes_or_none(sample, "json"),
            )
        index += 1
    check_sample_count(shard, index - 1 if ended_early else index, expected, ended_early=ended_early)
    yield _raw_row("eos", "", shard, index, count=index)


def check_sample_count(shard: str, read: int, expected: int | None, *, ended_early: bool = False) -> None:
    """The end-of-shard check: raise :class:`IncompleteShard` when ``read`` samples (skips included)
    differ from the ``expected`` count ``_info.json`` gives (None: it gives none, nothing to check)."""
    if expected is None or read == expected:
        return
    if ended_early:
        how = " (it was cut short: it ends mid-member or without the tar's end-of-archive block)"
    elif read < expected:
        how = " (a whole tar of fewer samples: written incompletely, or _info.json is stale)"
    else:
        how = ""
    raise IncompleteShard(
        f"{shard}: {read} samples read through to the end of the tar{how}, but _info.json says {expected}; "
        "the shard is incomplete and its work is not committed"
    )


def _bytes_or_none(sample: dict[str, Any], ext: str) -> bytes | None:
    value = next((v for k, v in sample.items() if k.lower() == ext), None)
    return value if isinstance(value, (bytes, bytearray)) else None


def _datasource_class():
    from ray.data.datasource import FileBasedDatasource

    class WebDatasetShards(FileBasedDatasource):
        _FILE_EXTENSIONS = ["tar"]

        def __init__(self, paths, *, retries: int, backoff_s: float, expected: dict[str, int], **kwargs) -> None:
            super().__init__(paths, **kwargs)
            self.retries, self.backoff_s, self.expected = retries, backoff_s, expected

        def _read_stream(self, stream: pa.NativeFile, path: str) -> Iterator[pa.Table]:
            rows: list[dict[str, Any]] = []
            reopen = lambda: self._open_input_source(self._filesystem, path)  # noqa: E731
            count = self.expected.get(path, self.expected.get(shard_key(path)))
            for row in raw_rows(
                stream, path, reopen=reopen, retries=self.retries, backoff_s=self.backoff_s, expected=count
            ):
                rows.append(row)
                if len(rows) >= _CHUNK_ROWS:
                    yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)

    return WebDatasetShards


def read_shards(
    paths: Sequence[str],
    *,
    filesystem=None,
    override_num_blocks: int | None = None,
    shuffle=None,
    retries: int = READ_RETRIES,
    backoff_s: float = READ_BACKOFF_S,
    expected: Mapping[str, int] | None = None,
):
    """A Ray Dataset of raw rows, one read task per shard where parallelism allows; ``shuffle``: Ray
    Data's file shuffle (None, "files" or a ``FileShuffleConfig``); ``retries``/``backoff_s``: see
    :func:`raw_rows`; ``expected``: each shard's sample count, by default what the ``_info.json``
    beside the shards gives (:func:`zoomvit.data.shards.expected_samples`); ``{}`` checks none."""
    import ray.data

    expected = dict(expected_samples(paths) if expected is None else expected)
    datasource = _datasource_class()(
        list(paths), filesystem=filesystem, shuffle=shuffle, retries=retries, backoff_s=backoff_s, expected=expected
    )
    return ray.data.read_datasource(datasource, override_num_blocks=override_num_blocks or len(paths))


def decode_batch(batch: pa.Table, *, num_classes: int, transform: ImageTransform) -> dict[str, np.ndarray]:
    """Raw rows to decoded rows: kind, key, shard, index, label, image (N, S, S, 3 uint8), box, stratum
    (the ``.json``'s, "" without one), reason, count; with ``transform.highres`` also image_hr (N, 2S, 2S, 3 uint8)."""
    rows = batch.to_pylist()
    n, size = len(rows), transform.image_size
    out: dict[str, np.ndarray] = {
        "kind": np.empty(n, dtype=object),
        "key": np.empty(n, dtype=object),
        "shard": np.empty(n, dtype=object),
        "index": np.zeros(n, dtype=np.int64),
        "label": np.full(n, -1, dtype=np.int64),
        "image": np.zeros((n, size, size, 3), dtype=np.uint8),
        **({"image_hr": np.zeros((n, 2 * size, 2 * size, 3), dtype=np.uint8)} if transform.highres else {}),
        "box": np.full((n, 4), np.nan, dtype=np.float32),
        "stratum": np.full(n, "", dtype=object),
        "reason": np.full(n, "", dtype=object),
        "count": np.zeros(n, dtype=np.int64),
    }
    for i, row in enumerate(rows):
        out["key"][i], out["shard"][i], out["index"][i] = row["key"], row["shard"], row["index"]
        out["count"][i] = row["count"] or 0
        if row["kind"] == "eos":
            out["kind"][i] = "eos"
            continue
        if row["kind"] == "error":
            out["kind"][i], out["reason"][i] = "skip", row["reason"]
            continue
        sample = {"__key__": row["key"], "__url__": row["shard"], "cls": row["cls"], "json": row["json"]}
        if row["ext"] is not None:
            sample[row["ext"]] = row["image"]
        decoded, reason = decode_sample(sample, num_classes=num_classes, transform=transform)
        if decoded is None:
            out["kind"][i], out["reason"][i] = "skip", reason.value
            continue
        out["kind"][i] = "sample"
        out["label"][i] = decoded.label
        out["image"][i] = decoded.image
        if decoded.image_hr is not None:
            out["image_hr"][i] = decoded.image_hr
        if decoded.box is not None:
            out["box"][i] = decoded.box
        stratum = (decoded.meta or {}).get("stratum")
        if isinstance(stratum, str):
            out["stratum"][i] = stratum
    return out


def keep_samples(batch: dict[str, np.ndarray], *, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The decoded samples of a batch (skip and end-of-shard rows dropped), ``columns`` only."""
    keep = batch["kind"] == "sample"
    return {c: batch[c][keep] for c in columns}


def read_decoded(
    paths: Sequence[str],
    *,
    num_classes: int,
    transform: ImageTransform,
    batch_size: int = 64,
    num_cpus: float = 1.0,
    filesystem=None,
    shuffle=None,
):
    """Shards read and decoded on Ray Data (CPU tasks), skip and end-of-shard rows included."""
    return read_shards(paths, filesystem=filesystem, shuffle=shuffle).map_batches(
        decode_batch,
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        fn_kwargs={"num_classes": num_classes, "transform": transform},
    )
