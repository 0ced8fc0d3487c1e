"""Driver side of a training stage: a Ray Train ``TorchTrainer`` running ``train_loop_per_worker``."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoomvit import logs
from zoomvit.checkpoints import Checkpoints
from zoomvit.config import TrainConfig
from zoomvit.data.shards import filesystem, is_url, local_path
from zoomvit.gpus import resolve_use_gpu
from zoomvit.train.loop import FINAL_WEIGHTS, HISTORY, WorkerConfig, train_loop_per_worker
from zoomvit.train.task_specs import TaskSpec


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    weights: Path
    checkpoint: str
    train_samples: int


def _require_decode_cpus(name: str, train: TrainConfig) -> None:
    """Streamed epochs are read and decoded while the workers train: on a cluster that the training
    workers fill exactly, Ray Data would get no CPU and the first epoch would wait forever. (A
    cluster too small for the workers is left alone: it has to grow, and an autoscaler can add CPUs.)"""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    reserved = train.num_workers * train.cpus_per_worker
    if reserved <= total < reserved + 1:
        raise ValueError(
            f"{name}: data.decoded=streamed decodes while training runs, but the {train.num_workers} workers x "
            f"{train.cpus_per_worker} CPUs take all {total:g} CPUs of the cluster: leave a CPU free (fewer num_workers "
            "or cpus_per_worker), add CPU nodes, or use data.decoded shared or per_stage"
        )


def checkpoint_storage(location: str):
    """Ray Train's ``storage_path`` and ``storage_filesystem`` for a path or URL. Object storage goes
    through fsspec (s3fs, gcsfs: the ``cloud`` extra, credentials and endpoint from the node's
    environment), as the shards do, rather than pyarrow's own S3 client."""
    if not is_url(location):
        return str(local_path(location)), None
    from fsspec.core import strip_protocol
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs = filesystem(location)  # first: a missing implementation names the extra
    return strip_protocol(location), PyFileSystem(FSSpecHandler(fs))


def run_training(
    *,
    name: str,
    task: TaskSpec,
    train: TrainConfig,
    train_ds,
    val_ds,
    out_dir: str | Path,
    tracking: dict[str, str] | None = None,
    streamed_samples: int | None = None,
    checkpoints: Checkpoints | None = None,
) -> TrainResult:
    """Train ``task`` on N workers; weights end in ``out_dir/model.safetensors``.

    The training set is materialised and counted, unless ``streamed_samples`` (its size, known
    beforehand) is given: then every epoch reads it anew and nothing is kept. Checkpoints go to
    ``checkpoints.location`` (a path or an fsspec URL such as ``s3://bucket/prefix``; default
    ``out_dir/ray``); rerunning with the same location resumes from the latest checkpoint of an
    interrupted run. Every worker calls ``checkpoints.fence`` before it starts and before each checkpoint.

    ``train.num_workers=0`` trains in this process instead, as Ray Train's local mode does (no worker
    actors, a world of one): the same worker class, fed by the datasets' iterators. Unlike Ray's local
    mode it keeps its last checkpoint, in ``<location>/driver`` (a local path), and resumes from it.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = checkpoints or Checkpoints()
    in_driver = train.num_workers == 0
    use_gpu = _driver_has_gpu(train.use_gpu) if in_driver else resolve_use_gpu(train.use_gpu)
    if train.max_train_samples:
        train_ds = train_ds.limit(train.max_train_samples)
    train_ds = train_ds.drop_columns(["key", "stratum"])  # strings do not become tensors
    val_ds = val_ds.drop_columns(["key", "stratum"]).materialize()
    if streamed_samples is None:
        train_ds = train_ds.materialize()
        n_train = train_ds.count()
        if train.shuffle_buffer:  # a different (seeded) block order every epoch
            train_ds = train_ds.randomize_block_order(seed=train.seed)
    else:  # an upper bound when samples are skipped (the cosine schedule then stops just short of its minimum)
        if not in_driver:
            _require_decode_cpus(name, train)
        n_train = min(streamed_samples, train.max_train_samples or streamed_samples)
    if train.rand_augment:  # after materialize: a fresh draw every epoch
        from zoomvit.train.data import rand_augment_batch

        train_ds = train_ds.map_batches(
            rand_augment_batch, fn_kwargs={"spec": train.rand_augment}, batch_format="numpy"
        )
    world = max(1, train.num_workers)
    per_step = train.batch_size * world
    if n_train < per_step:
        raise ValueError(
            f"{name}: {n_train} training samples are fewer than one step ({world} workers x batch {train.batch_size})"
        )
    worker = WorkerConfig(
        name=name,
        task=task,
        train=train,
        use_gpu=use_gpu,
        steps_per_epoch=n_train // per_step,
        tracking=tracking,
        verbose=logs.verbose(),
        fence=checkpoints.fence,
    )
    location = checkpoints.location or str(out_dir / "ray")
    if in_driver:
        return _fit_in_driver(worker, train_ds, val_ds, location, out_dir, n_train)
    storage_path, storage_filesystem = checkpoint_storage(location)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **train.resources},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            logging_config=LoggingConfig(log_level=logs.train_log_level()),
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        source = Path(ckpt_dir) / FINAL_WEIGHTS
        if not source.exists():
            raise RuntimeError(f"{name}: the final checkpoint holds no {FINAL_WEIGHTS}")
        shutil.copyfile(source, out_dir / FINAL_WEIGHTS)
        history = json.loads((Path(ckpt_dir) / HISTORY).read_text())
    return TrainResult(
        metrics=dict(result.metrics),
        history=history,
        weights=out_dir / FINAL_WEIGHTS,
        checkpoint=result.checkpoint.path,
        train_samples=n_train,
    )


def _fit_in_driver(worker: WorkerConfig, train_ds, val_ds, location: str, out_dir: Path, n_train: int) -> TrainResult:
    """The worker class run in this process on a world of one (``num_workers=0``)."""
    import torch

    from zoomvit.train.loop import WorkerTrainer
    from zoomvit.train.worker_env import local_env

    if is_url(location):
        raise ValueError(
            f"{worker.name}: train.num_workers=0 trains in the driver and keeps its checkpoint on a local path, "
            f"not at {location}: use num_workers >= 1 with a bucket cache"
        )
    keep = local_path(location) / "driver"
    device = "cuda" if worker.use_gpu else "cpu"
    env, reports = local_env(train_ds.iterator(), val_ds.iterator(), device=device, keep=keep)
    threads = torch.get_num_threads()  # the worker sets its own (cpus_per_worker)
    try:
        with logs.dropped_prints(r"^DeepSpeed \S+ built successfully$", verbose_=worker.verbose):
            WorkerTrainer(worker, env).fit()
    finally:
        torch.set_num_threads(threads)
    final = reports.checkpoint
    if final is None or not (final / FINAL_WEIGHTS).exists():
        raise RuntimeError(f"{worker.name}: training finished without a final checkpoint in {keep}")
    shutil.copyfile(final / FINAL_WEIGHTS, out_dir / FINAL_WEIGHTS)
    history = json.loads((final / HISTORY).read_text())
    return TrainResult(
        metrics=dict(reports.metrics[-1] if reports.metrics else history[-1]),
        history=history,
        weights=out_dir / FINAL_WEIGHTS,
        checkpoint=str(final),
        train_samples=n_train,
    )


def _driver_has_gpu(use_gpu: bool | str) -> bool:
    """``use_gpu`` for training in the driver: ``auto`` is whether this process sees a GPU."""
    import torch

    if use_gpu == "auto":
        return torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise ValueError("train.use_gpu is true but the driver, which trains when num_workers=0, sees no GPU")
    return bool(use_gpu)
