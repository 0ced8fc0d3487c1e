"""What a training worker is handed by whoever runs it: its rank and world, its device, its data
shards, the checkpoint to resume from and where an epoch's metrics and checkpoint go. Ray Train
provides them (:func:`ray_env`) or a plain script does (:func:`local_env`): one worker class
(:class:`~zoomvit.train.loop.WorkerTrainer`) runs under both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class Shard(Protocol):
    """Ray Data's ``DataIterator`` as the worker uses it."""

    def iter_torch_batches(
        self, *, batch_size: int, drop_last: bool = False, device: Any = None
    ) -> Iterator[dict[str, torch.Tensor]]: ...


@dataclass
class WorkerEnv:
    rank: int
    world: int
    device: torch.device
    train_shard: Shard
    val_shard: Shard
    restored: Callable[[], contextlib.AbstractContextManager[str | None]]  # the directory to resume from, or None
    report: Callable[[dict[str, Any], str], None]  # an epoch's metrics and its checkpoint directory


def ray_env(*, use_gpu: bool) -> WorkerEnv:
    """The worker's environment inside Ray Train's ``train_loop_per_worker``."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()

    @contextlib.contextmanager
    def restored() -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as ckpt_dir:
            yield ckpt_dir

    def report(metrics: dict[str, Any], ckpt_dir: str) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))

    return WorkerEnv(
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device() if use_gpu else torch.device("cpu"),
        train_shard=ray.train.get_dataset_shard("train"),
        val_shard=ray.train.get_dataset_shard("val"),
        restored=restored,
        report=report,
    )


@dataclass
class TensorShard:
    """In-memory batches in the shape Ray Data yields them: columns of equal length (numpy or torch),
    iterated ``repeat`` times in order (a fixed batch repeated: ``repeat`` > 1 on one batch's rows)."""

    columns: dict[str, Any]
    repeat: int = 1

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def iter_torch_batches(
        self, *, batch_size: int, drop_last: bool = False, device: Any = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self)
        tensors = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in self.columns.items()}
        for _ in range(self.repeat):
            for start in range(0, n, batch_size):
                if drop_last and start + batch_size > n:
                    break
                yield {k: v[start : start + batch_size].to(device) for k, v in tensors.items()}


@dataclass
class LocalReports:
    """What a :func:`local_env` worker reported: each epoch's metrics, and its last checkpoint kept (the
    one it resumed from until it reports another)."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


def local_env(
    train: Shard, val: Shard, *, device: torch.device | str, keep: Path | None = None
) -> tuple[WorkerEnv, LocalReports]:
    """A single worker's environment for a plain script (no Ray): rank 0 of a world of one, in a
    process group of its own (gloo; NCCL on a GPU), resuming from and keeping checkpoints in ``keep``."""
    device = torch.device(device)
    if not torch.distributed.is_initialized():
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
        # an in-process store: no port to pick, so two such scripts on one machine never collide
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    reports = LocalReports()

    @contextlib.contextmanager
    def restored() -> Iterator[str | None]:
        candidates = [] if keep is None else [keep, _aside(keep)]
        reports.checkpoint = next((p for p in candidates if (p / "history.json").exists()), None)
        yield None if reports.checkpoint is None else str(reports.checkpoint)

    def report(metrics: dict[str, Any], ckpt_dir: str) -> None:
        reports.metrics.append(metrics)
        if keep is None:
            return
        staged = keep.with_name(keep.name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(ckpt_dir, staged)
        if keep.exists():  # moved aside, not deleted, until the new one is in place: a crash leaves one whole
            shutil.rmtree(_aside(keep), ignore_errors=True)
            os.replace(keep, _aside(keep))
        os.replace(staged, keep)
        shutil.rmtree(_aside(keep), ignore_errors=True)
        reports.checkpoint = keep

    env = WorkerEnv(rank=0, world=1, device=device, train_shard=train, val_shard=val, restored=restored, report=report)
    return env, reports


def _aside(keep: Path) -> Path:
    return keep.with_name(keep.name + ".old")
