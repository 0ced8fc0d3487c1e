"""Relevance maps on disk: one Parquet file per shard group, committed atomically.

Columns: key, shard, label, target, teacher_pred, teacher_prob, grid_h, grid_w, relevance
(list<float16>, row-major grid), teacher_logits (list<float16>, for distillation without a second
teacher pass). File metadata records the teacher, method, input size, package
version, fingerprint and the shard group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zoomvit.data.shards import filesystem
from zoomvit.durable import write_durably

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("label", pa.int32()),
        ("target", pa.int32()),
        ("teacher_pred", pa.int32()),
        ("teacher_prob", pa.float32()),
        ("grid_h", pa.int16()),
        ("grid_w", pa.int16()),
        ("relevance", pa.list_(pa.float16())),
        ("teacher_logits", pa.list_(pa.float16())),
    ]
)
_LISTS = ("relevance", "teacher_logits")
META_KEY = b"zoomvit"


GROUP_FILES = "*-group-*"  # a group's Parquet file and its commit record (``.skips.json``)


def group_path(out_dir: str | Path, split: str, group: int) -> Path:
    return Path(out_dir) / f"{split}-group-{group:05d}.parquet"


def write_group(rows: Iterable[dict[str, Any]], path: str | Path, metadata: dict[str, Any]) -> int:
    """Write rows (sorted by shard then key) to ``path`` durably (:mod:`zoomvit.durable`); returns the row count."""
    rows = sorted(rows, key=lambda r: (r["shard"], r["key"]))
    columns = {name: [r[name] for r in rows] for name in SCHEMA.names if name not in _LISTS}
    for name in _LISTS:
        values = [None if r.get(name) is None else np.asarray(r[name], dtype=np.float16) for r in rows]
        columns[name] = pa.array(values, type=pa.list_(pa.float16()))
    table = pa.table(columns, schema=SCHEMA)
    table = table.replace_schema_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, lambda tmp: pq.write_table(table, tmp))
    return len(rows)


def read_metadata(path: str | Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def read_maps(out_dir: str | Path, split: str | None = None) -> pa.Table:
    """All committed groups of a relevance output (one split or all), concatenated; ``out_dir`` a local
    directory or a URL (a relevance output in a bucket)."""
    pattern = f"{split}-group-*.parquet" if split else "*-group-*.parquet"
    fs = filesystem(str(out_dir))
    files = sorted(fs.glob(f"{str(out_dir).rstrip('/')}/{pattern}"))
    if not files:
        raise ValueError(f"no relevance maps ({pattern}) in {str(out_dir)!r}")
    tables = []
    for f in files:
        with fs.open(f, "rb") as source:
            table = pq.read_table(source)
        for field in SCHEMA:
            if field.name not in table.column_names:  # written before the column existed
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        tables.append(table.select(SCHEMA.names).cast(SCHEMA))
    return pa.concat_tables(tables)


def logits_array(table: pa.Table) -> np.ndarray:
    """The teacher_logits column as (N, K) float32; ValueError when the maps were written without it."""
    column = table["teacher_logits"]
    if column.null_count:
        raise ValueError(
            "these relevance maps carry no teacher logits (written by an older version): rerun with --force relevance"
        )
    if table.num_rows == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(table.num_rows, -1)


def maps_array(table: pa.Table) -> np.ndarray:
    """The relevance column as (N, grid_h, grid_w) float32."""
    if table.num_rows == 0:
        return np.zeros((0, 0, 0), dtype=np.float32)
    gh, gw = int(table["grid_h"][0].as_py()), int(table["grid_w"][0].as_py())
    flat = table["relevance"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(table.num_rows, gh, gw)


def attach_targets(batch: dict[str, np.ndarray], *, targets_ref) -> dict[str, np.ndarray]:
    """Adds each row's relevance map (column ``map``) and/or teacher logits (``teacher_logits``) by
    key; drops rows the relevance stage has nothing for. ``targets_ref``: the object-store copy of
    ``zoomvit.train.data.relevance_targets``, read zero-copy by every task."""
    import ray

    targets = ray.get(targets_ref)
    keys = targets["keys"]
    batch_keys = np.asarray(batch["key"], dtype=str)
    rows = np.searchsorted(keys, batch_keys).clip(max=max(len(keys) - 1, 0))
    keep = (keys[rows] == batch_keys) if len(keys) else np.zeros(len(batch_keys), dtype=bool)
    out = {c: v[keep] for c, v in batch.items()}
    if "maps" in targets:
        out["map"] = targets["maps"][rows[keep]]
    if "logits" in targets:
        out["teacher_logits"] = targets["logits"][rows[keep]]
    return out
