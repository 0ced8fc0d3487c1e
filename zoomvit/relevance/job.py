"""The relevance stage: WebDataset shards -> Ray Data decode (CPU tasks) -> teacher attribution in
an actor pool (GPU when asked and present) -> one Parquet file per shard group.

A group is committed once every row of its shards has arrived (the reader ends each shard with
a row that carries the shard's row count), so a killed run keeps its finished groups and a rerun
computes only the missing ones. A group's skip counts (``.skips.json``), written after its Parquet
file, are its commit record and carry that file's sha256: a rerun recomputes a group whose bytes
changed, alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import zoomvit
from zoomvit.config import DataConfig, RelevanceConfig, TeacherConfig
from zoomvit.data.decode import ImageTransform, SkipReason, SkipReport
from zoomvit.data.relevance_store import group_path, read_metadata, write_group
from zoomvit.data.shards import shard_key
from zoomvit.durable import write_json_durably
from zoomvit.gpus import resolve_use_gpu
from zoomvit.integrity import check_content, content_hash

MANIFEST = "relevance.json"
log = logging.getLogger(__name__)


class RelevanceActor:
    """Holds one teacher; turns decoded batches into relevance rows (other rows pass through)."""

    def __init__(
        self,
        *,
        teacher: dict[str, Any],
        method: str,
        target: str,
        mean,
        std,
        use_gpu: bool,
        threads: int,
        decode: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from zoomvit.relevance.teacher import load_teacher

        self.decode = decode  # decode_batch kwargs when raw rows arrive (relevance.decode_in_actor)
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_teacher(**teacher).to(self.device)
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.method, self.target = method, target
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        import torch

        from zoomvit.relevance.attribution import relevance_maps

        if self.decode is not None:
            from zoomvit.data.ingest import decode_batch

            batch = decode_batch(batch, **self.decode)
        n = len(batch["kind"])
        gh, gw = self.grid
        out = {k: batch[k] for k in ("kind", "key", "shard", "index", "label", "reason", "count")}
        out["target"] = np.full(n, -1, dtype=np.int64)
        out["teacher_pred"] = np.full(n, -1, dtype=np.int64)
        out["teacher_prob"] = np.zeros(n, dtype=np.float32)
        out["relevance"] = np.zeros((n, gh * gw), dtype=np.float32)
        out["grid_h"] = np.full(n, gh, dtype=np.int64)
        out["grid_w"] = np.full(n, gw, dtype=np.int64)
        out["teacher_logits"] = np.zeros((n, self.model.num_classes), dtype=np.float32)
        is_sample = batch["kind"] == "sample"
        if is_sample.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][is_sample])).to(self.device)
            x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            labels = torch.from_numpy(batch["label"][is_sample]) if self.target == "label" else None
            result = relevance_maps(self.model, x, method=self.method, labels_B=labels)
            out["target"][is_sample] = result.target_B.cpu().numpy()
            out["teacher_pred"][is_sample] = result.pred_B.cpu().numpy()
            out["teacher_prob"][is_sample] = result.prob_B.cpu().numpy()
            out["relevance"][is_sample] = result.maps_BHW.flatten(1).cpu().numpy()
            out["teacher_logits"][is_sample] = result.logits_BK.float().cpu().numpy()
        return out


@dataclass
class _Group:
    split: str
    index: int
    shards: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    skips: SkipReport = field(default_factory=SkipReport)
    received: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)

    def complete(self) -> bool:
        return all(s in self.expected and self.received.get(s, 0) == self.expected[s] for s in self.shards)


def run_relevance_stage(
    *,
    data: DataConfig,
    teacher: TeacherConfig,
    relevance: RelevanceConfig,
    out_dir: str | Path,
    checkpoint: str | None = None,
    fingerprint: str = "",
    on_group_committed: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Compute the missing relevance groups under ``out_dir``; returns the stage manifest.

    ``checkpoint`` overrides ``teacher.checkpoint`` (the teacher stage's output).
    """
    if not teacher.pretrained and not (checkpoint or teacher.checkpoint):
        raise ValueError("the relevance stage needs a trained teacher: teacher.pretrained=true or a checkpoint")
    data = data.at_size(teacher.input_size)  # the teacher reads the images at its own size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_spec = {
        "model": teacher.model,
        "pretrained": teacher.pretrained,
        "checkpoint": checkpoint or teacher.checkpoint,
        "num_classes": data.num_classes,
        "model_kwargs": dict(teacher.model_kwargs),
    }
    groups: list[_Group] = []
    for split in relevance.splits:
        paths = data.shard_paths(split)
        for i in range(0, len(paths), relevance.shards_per_group):
            groups.append(
                _Group(
                    split=split, index=i // relevance.shards_per_group, shards=paths[i : i + relevance.shards_per_group]
                )
            )
    base_meta = {
        "teacher": teacher_spec["model"],
        "teacher_checkpoint": teacher_spec["checkpoint"],
        "pretrained": teacher.pretrained,
        "method": relevance.method,
        "target": relevance.target,
        "input_size": data.image_size,
        "package_version": zoomvit.__version__,
        "fingerprint": fingerprint,
    }
    todo = [g for g in groups if not _committed(g, out_dir, fingerprint)]
    cached = [g for g in groups if g not in todo]

    use_gpu = resolve_use_gpu(relevance.use_gpu)
    writer = _GroupWriter(out_dir=out_dir, base_meta=base_meta, max_bad_fraction=data.max_bad_fraction)
    writer.on_committed = on_group_committed
    for g in cached:
        writer.report.merge(SkipReport.from_dict(json.loads(_skips_path(g, out_dir).read_text())))
    start = time.perf_counter()
    if todo:
        ds = _attribution_dataset(todo, data, relevance, teacher_spec, bool(use_gpu))
        _collect(ds, todo, writer)
    elapsed = time.perf_counter() - start
    report = writer.report
    manifest = {
        **base_meta,
        "groups": [
            {"split": g.split, "index": g.index, "file": group_path(out_dir, g.split, g.index).name, "shards": g.shards}
            for g in groups
        ],
        "rows": _count_rows(groups, out_dir),
        "skips": report.to_dict(),
        "stats": {
            "groups_total": len(groups),
            "groups_cached": len(cached),
            "groups_computed": writer.groups,
            "images_computed": writer.samples,
            "seconds": round(elapsed, 3),
            "images_per_s": writer.samples / elapsed if writer.samples and elapsed > 0 else 0.0,
            "teacher_acc": writer.correct / writer.samples if writer.samples else None,
            "use_gpu": bool(use_gpu),
        },
    }
    write_json_durably(out_dir / MANIFEST, manifest, sort_keys=True)
    return manifest


@dataclass
class _GroupWriter:
    """Writes each finished group (Parquet + its skip counts) and keeps the job's running totals."""

    out_dir: Path
    base_meta: dict[str, Any]
    max_bad_fraction: float
    report: SkipReport = field(default_factory=SkipReport)
    on_committed: Callable[[str, int], None] | None = None
    groups: int = 0
    samples: int = 0
    correct: int = 0

    def commit(self, g: _Group) -> None:
        kept = _commit(g, self.out_dir, self.base_meta)
        self.groups += 1
        self.samples += len(kept)
        self.correct += sum(r["teacher_pred"] == r["label"] for r in kept)
        self.report.merge(g.skips)
        if self.on_committed is not None:
            self.on_committed(g.split, g.index)
        self.report.check(self.max_bad_fraction)


def _attribution_dataset(todo: list[_Group], data, relevance, teacher_spec: dict[str, Any], use_gpu: bool):
    """The Ray Dataset of the groups' shards through the attribution actors: one row per sample
    (relevance, or a skip) and one end-of-shard row per shard."""
    import ray.data

    from zoomvit.data.ingest import read_decoded, read_shards

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    held = relevance.concurrency * relevance.num_cpus_per_actor
    if cpus and cpus - held < 1:
        raise ValueError(
            f"relevance.concurrency x num_cpus_per_actor = {held:g} leaves {cpus - held:g} of the cluster's "
            f"{cpus:g} CPUs; a shard read task needs a whole CPU, so leave at least one"
        )
    transform = ImageTransform(image_size=data.image_size, resize_mode=data.resize_mode, crop_pct=data.crop_pct)
    paths = [p for g in todo for p in g.shards]
    decode = {"num_classes": data.num_classes, "transform": transform}
    if relevance.decode_in_actor:
        ds = read_shards(paths)
    else:
        ds = read_decoded(paths, **decode, batch_size=relevance.decode_batch_size, num_cpus=relevance.decode_num_cpus)
    threads = relevance.actor_threads
    if threads is None:
        node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
        shared = min(node_cpus, cpus // relevance.concurrency)
        threads = int(relevance.num_cpus_per_actor) if use_gpu else max(1, int(shared))
    ds = ds.map_batches(
        RelevanceActor,
        fn_constructor_kwargs={
            "teacher": teacher_spec,
            "method": relevance.method,
            "target": relevance.target,
            "mean": data.mean,
            "std": data.std,
            "use_gpu": use_gpu,
            "threads": threads,
            "decode": decode if relevance.decode_in_actor else None,
        },
        batch_size=relevance.batch_size,
        batch_format="pyarrow" if relevance.decode_in_actor else "numpy",
        compute=ray.data.ActorPoolStrategy(size=relevance.concurrency),
        num_cpus=relevance.num_cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        resources=dict(relevance.resources) or None,
    )
    return ds


def _collect(ds, todo: list[_Group], writer: _GroupWriter) -> None:
    """Sort the dataset's rows into their groups; commit each group as soon as every shard of it is complete.
    Rows name their shard as Ray's readers report it (``bucket/key`` for ``s3://bucket/key``): each is
    mapped back to the group's own path."""
    by_shard = {shard_key(p): (g, p) for g in todo for p in g.shards}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        touched = set()
        for i in range(len(batch["kind"])):
            g, shard = by_shard[shard_key(str(batch["shard"][i]))]
            touched.add(id(g))
            kind = batch["kind"][i]
            if kind == "eos":
                g.expected[shard] = int(batch["count"][i])
                continue
            g.received[shard] = g.received.get(shard, 0) + 1
            if kind == "skip":
                g.skips.add(str(batch["reason"][i]), str(batch["key"][i]), shard)
                continue
            g.rows.append(
                {
                    "key": str(batch["key"][i]),
                    "shard": shard,
                    "index": int(batch["index"][i]),
                    "label": int(batch["label"][i]),
                    "target": int(batch["target"][i]),
                    "teacher_pred": int(batch["teacher_pred"][i]),
                    "teacher_prob": float(batch["teacher_prob"][i]),
                    "grid_h": int(batch["grid_h"][i]),
                    "grid_w": int(batch["grid_w"][i]),
                    "relevance": batch["relevance"][i],
                    "teacher_logits": batch["teacher_logits"][i],
                }
            )
        for g in [g for g in todo if id(g) in touched and g.complete()]:
            writer.commit(g)
            todo = [t for t in todo if t is not g]
    assert not todo, f"groups never completed: {[(g.split, g.index) for g in todo]}"


def _commit(g: _Group, out_dir: Path, base_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Write the group's rows (first of each key, in shard order) and its skip counts; the rows kept."""
    order = {s: i for i, s in enumerate(g.shards)}
    seen: set[str] = set()
    kept = []
    for row in sorted(g.rows, key=lambda r: (order.get(r["shard"], len(order)), r["index"])):
        if row["key"] in seen:
            g.skips.add(SkipReason.duplicate_key, row["key"], row["shard"])
            continue
        seen.add(row["key"])
        kept.append(row)
    g.skips.ok(len(kept))
    path = group_path(out_dir, g.split, g.index)
    write_group(kept, path, {**base_meta, "split": g.split, "group": g.index, "shards": g.shards})
    # the skip counts, written last, are the group's commit record: they carry the Parquet file's content hash
    record = {**g.skips.to_dict(), "sha256": content_hash(path)}
    write_json_durably(_skips_path(g, out_dir), record, sort_keys=True)
    return kept


def _committed(g: _Group, out_dir: Path, fingerprint: str) -> bool:
    """Whether the group's Parquet file and skip counts are there, readable, of this fingerprint and
    (when its commit record has one: groups committed since hashes were recorded) of the content hash
    recorded at commit; a damaged group (cut short, not Parquet, unreadable skip counts, a changed
    byte) is logged and recomputed alone."""
    path = group_path(out_dir, g.split, g.index)
    if not path.exists() or not _skips_path(g, out_dir).exists():
        return False
    try:
        meta = read_metadata(path)
        record = json.loads(_skips_path(g, out_dir).read_text())
        SkipReport.from_dict(record)
        if meta.get("shards") != g.shards or meta.get("fingerprint") != fingerprint:
            return False
        check_content(path, record.get("sha256"))
    except Exception as exc:  # noqa: BLE001 - any damage means recompute, never a crash
        log.warning(
            "relevance %s group %d is damaged (%s: %s): recomputing it", g.split, g.index, type(exc).__name__, exc
        )
        return False
    return True


def _skips_path(g: _Group, out_dir: Path) -> Path:
    return skips_path(group_path(out_dir, g.split, g.index))


def skips_path(group: Path) -> Path:
    """A group's commit record beside its Parquet file."""
    return group.with_suffix(".skips.json")


def _count_rows(groups: list[_Group], out_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(group_path(out_dir, g.split, g.index)).num_rows for g in groups)
