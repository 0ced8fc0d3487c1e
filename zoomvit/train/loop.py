"""The per-worker training loop: data shards in, a DeepSpeed engine, a checkpoint per epoch. What
the worker is handed (rank, world, device, shards, the checkpoint to resume from, where reports go)
comes from Ray Train or from a plain script (:mod:`zoomvit.train.worker_env`).

Every rank saves its DeepSpeed shard into the same checkpoint directory (file names carry the
rank), then all ranks report it; rank 0 also writes a consolidated fp32 ``model.safetensors`` into
the final checkpoint and alone logs to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoomvit.config import TrainConfig
from zoomvit.logs import configure as configure_logging
from zoomvit.logs import dropped_prints, quiet_libraries
from zoomvit.train.task_specs import TaskSpec

if TYPE_CHECKING:
    from zoomvit.train.worker_env import WorkerEnv

log = logging.getLogger(__name__)
STEP_METRICS_EVERY = 10
PROGRESS_EVERY_S = 30.0

FINAL_WEIGHTS = "model.safetensors"
HISTORY = "history.json"
RNG_STATE = "rng_rank{rank}.pt"


def build_deepspeed_config(train: TrainConfig, *, use_gpu: bool, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config from the recipe (optimizer and schedule stay ours)."""
    precision = train.precision
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"
    if precision in ("bf16", "fp16") and not use_gpu:
        raise ValueError(f"precision {precision} needs GPU workers; use fp32 (or auto) on CPU")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.grad_clip:
        config["gradient_clipping"] = train.grad_clip
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    return config


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything a training worker is handed: the stage's name, its task spec and recipe, the device
    choice, the steps per epoch, the MLflow run rank 0 logs into (uri and run_id), the verbosity and
    the fence checked before setup and before every checkpoint."""

    name: str
    task: TaskSpec
    train: TrainConfig
    use_gpu: bool
    steps_per_epoch: int
    tracking: dict[str, str] | None
    verbose: bool
    fence: Callable[[], None] | None = None  # Checkpoints.fence


def train_loop_per_worker(loop_config: dict[str, WorkerConfig]) -> None:
    """Ray Train's per-worker entry point (Ray hands over a dict: the config is its one entry)."""
    config = loop_config["worker"]
    configure_logging()
    quiet_libraries(verbose_=config.verbose)
    from zoomvit.train.worker_env import ray_env

    with dropped_prints(r"^DeepSpeed \S+ built successfully$", verbose_=config.verbose):
        WorkerTrainer(config, ray_env(use_gpu=config.use_gpu)).fit()


class WorkerTrainer:
    """One worker's training run, in torchtitan's shape: setup (model, DeepSpeed engine, schedule,
    resume), then per epoch train / evaluate / checkpoint. ``env``: what Ray Train (or a script) hands
    the worker. :meth:`train_step` is one step of :meth:`fit`, for a caller that drives steps itself."""

    def __init__(self, config: WorkerConfig, env: WorkerEnv) -> None:
        if not config.use_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        from zoomvit.train.objectives import build_task

        self.env = env
        self.rank, self.world = env.rank, env.world
        self.name = config.name
        self.fence = config.fence
        if self.fence is not None:
            self.fence()  # a restart after a takeover fails at once, not after an epoch
        train = self.train = config.train
        use_gpu = config.use_gpu
        torch.manual_seed(train.seed + self.rank)
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
        self.device = env.device
        self.task = build_task(config.task, train, seed=train.seed + self.rank)
        model = self.task.build_model()
        self.optimizer = create_optimizer_v2(model, opt=train.optimizer, lr=train.lr, weight_decay=train.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=self.optimizer,
            config=build_deepspeed_config(train, use_gpu=use_gpu, world_size=self.world),
            dist_init_required=False,
        )
        self.dtype = next(p for p in self.engine.module.parameters()).dtype
        self.ema = None
        if train.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.engine.module, decay=train.ema_decay)
        self.steps_per_epoch = max(1, config.steps_per_epoch // train.grad_accum)
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=self.steps_per_epoch * train.epochs,
            lr_min=train.min_lr,
            warmup_t=int(self.steps_per_epoch * train.warmup_epochs),
            warmup_lr_init=train.lr * 0.01,
            t_in_epochs=False,
        )
        self.start_epoch, self.history = self._resume()
        self.start_checksum = weights_checksum(self.engine.module.state_dict())
        tracking = config.tracking if self.rank == 0 else None  # rank 0 alone logs, into the stage's run
        self.metric_log = self.system_metrics = None
        if tracking:  # imported here: a worker without tracking runs where MLflow is not installed
            from zoomvit.tracking.runs import MetricBuffer, SystemMetrics, Tracker

            self.metric_log = MetricBuffer(Tracker(tracking["uri"]), tracking["run_id"])
            self.system_metrics = SystemMetrics(tracking)
        self.train_shard, self.val_shard = env.train_shard, env.val_shard
        self.global_step = self.start_epoch * self.steps_per_epoch
        self._last_progress = time.perf_counter()

    def _resume(self) -> tuple[int, list[dict[str, Any]]]:
        """The epoch to start from and the history so far: from the last checkpoint after a restart."""
        with self.env.restored() as ckpt_dir:
            if ckpt_dir is None:
                return 0, []
            _, client_state = self.engine.load_checkpoint(ckpt_dir, tag="deepspeed")
            rng_path = Path(ckpt_dir) / RNG_STATE.format(rank=self.rank)
            if rng_path.exists():  # the draws continue where they stopped: a resumed run equals an uninterrupted one
                self._set_rng_state(torch.load(rng_path, weights_only=True))
        if self.ema is not None:
            self.ema.module.load_state_dict(client_state["ema"])
        start_epoch = int(client_state["epoch"]) + 1
        if self.rank == 0:
            log.info(f"[{self.name}] resumed from the checkpoint of epoch {start_epoch}")
        return start_epoch, client_state["history"]

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """The random streams an epoch draws from: torch's (dropout, drop-path), the task's augmentation
        generator and, on a GPU, CUDA's. DeepSpeed's client state is rank 0's alone, so each rank saves its own."""
        state = {"torch": torch.get_rng_state(), "task": self.task.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        self.task.generator.set_state(state["task"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def fit(self) -> None:
        try:
            self._epochs()
        finally:
            if self.system_metrics is not None:
                self.system_metrics.stop()
        if self.metric_log is not None and (left := self.metric_log.close()):
            log.warning(f"[{self.name}] {left} epochs' metrics did not reach MLflow; the driver logs them later")

    def _epochs(self) -> None:
        for epoch in range(self.start_epoch, self.train.epochs):
            metrics = self.train_epoch(epoch)
            metrics.update(self.evaluate())
            self.history.append(metrics)
            self.checkpoint(epoch, metrics)
            if self.metric_log is not None:
                self.metric_log.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            if self.rank == 0:
                log.info(
                    f"[{self.name}] epoch {epoch + 1}/{self.train.epochs} "
                    + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)),
                )

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        engine, task = self.engine, self.task
        engine.train()
        start, images, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        batches = epoch_batches(self.train_shard, self.train, epoch=epoch, rank=self.rank, device=self.device)
        for batch in batches:
            loss = self.train_step(batch)
            images += batch["label"].shape[0]
            loss_sum += loss.detach().item()
            steps += 1
            if self.rank == 0:
                self._progress(epoch, steps, images, loss_sum, start)
        seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / max(steps, 1),
            "train_img_per_s": images * self.world / max(seconds, 1e-9),
            "train_images": images * self.world,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if epoch == self.start_epoch:
            counts = getattr(task, "param_counts", {})
            metrics.update(start_epoch=self.start_epoch, start_weights_checksum=self.start_checksum, **counts)
        return metrics

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch: the task's loss (augmentation included), backward, and the optimizer and
        schedule at an accumulation boundary. Returns the loss."""
        engine = self.engine
        loss = self.task.train_loss(engine, batch, self.dtype)
        engine.backward(loss)
        engine.step()
        if engine.is_gradient_accumulation_boundary():
            self.global_step += 1
            self.scheduler.step_update(self.global_step)
            if self.ema is not None:
                self.ema.update(engine.module, step=self.global_step)
        return loss

    def _progress(self, epoch: int, steps: int, images: int, loss_sum: float, start: float) -> None:
        """Every ``STEP_METRICS_EVERY`` steps a step-level point of the training curve for MLflow; at most
        every ``PROGRESS_EVERY_S`` seconds a console line with the epoch's progress and ETA."""
        if self.metric_log is not None and steps % STEP_METRICS_EVERY == 0:
            lr = self.optimizer.param_groups[0]["lr"]
            self.metric_log.log({"step_train_loss": loss_sum / steps, "step_lr": lr}, step=self.global_step)
        now = time.perf_counter()
        if now - self._last_progress < PROGRESS_EVERY_S or steps >= self.steps_per_epoch:
            return
        self._last_progress = now
        rate = images * self.world / max(now - start, 1e-9)
        left = (self.steps_per_epoch - steps) / max(steps / (now - start), 1e-9)
        log.info(
            f"[{self.name}] epoch {epoch + 1}/{self.train.epochs} step {steps}/{self.steps_per_epoch} "
            f"loss {loss_sum / steps:.3f} · {rate:.0f} img/s · epoch ETA {left:.0f} s"
        )

    def evaluate(self) -> dict[str, float]:
        """Val metrics of the model (and ``ema_``-prefixed ones of its EMA)."""
        self.engine.eval()
        args = (self.val_shard, self.train, self.device, self.dtype, self.rank, self.world)
        metrics = _evaluate(self.task, self.engine, *args)
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in _evaluate(self.task, self.ema.module, *args).items()})
        return metrics

    def checkpoint(self, epoch: int, metrics: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint with the history (and the EMA), the final fp32 weights after the last
        epoch, reported (to Ray Train) with the epoch's metrics."""
        if self.fence is not None:
            self.fence()
        client_state: dict[str, Any] = {"epoch": epoch, "history": self.history}
        if self.ema is not None:
            client_state["ema"] = self.ema.module.state_dict()
        with tempfile.TemporaryDirectory() as ckpt_dir:
            self.engine.save_checkpoint(ckpt_dir, tag="deepspeed", client_state=client_state)
            torch.save(self._rng_state(), os.path.join(ckpt_dir, RNG_STATE.format(rank=self.rank)))  # per rank
            if self.rank == 0:
                with open(os.path.join(ckpt_dir, HISTORY), "w") as f:
                    json.dump(self.history, f)
            if epoch == self.train.epochs - 1:
                final = os.path.join(ckpt_dir, FINAL_WEIGHTS)
                _save_final(self.engine, final, self.rank, self.train.zero_stage, ema=self.ema)
            torch.distributed.barrier()
            self.env.report(metrics, ckpt_dir)


def epoch_batches(shard, train: TrainConfig, *, epoch: int, rank: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of full training batches, rows shuffled within ``shuffle_buffer`` rows (seeded by
    seed, epoch and rank). The shuffle runs on the collated tensors: Ray Data's local shuffle buffer
    re-slices Arrow blocks for every batch and cost a third of the demo's training throughput."""
    size, buffer = train.batch_size, train.shuffle_buffer
    batches = shard.iter_torch_batches(batch_size=size, drop_last=not buffer, device=device)
    if not buffer:
        yield from batches
        return
    generator = torch.Generator().manual_seed(train.seed + 10_000 * epoch + rank)
    pending: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        pending.append(batch)
        if sum(len(b["label"]) for b in pending) >= buffer:
            full, rest = _shuffle_rows(pending, size, generator)
            yield from full
            pending = [rest] if rest else []
    if pending:
        yield from _shuffle_rows(pending, size, generator)[0]  # the last partial batch is dropped


def _shuffle_rows(batches: list[dict[str, torch.Tensor]], size: int, generator: torch.Generator):
    """The rows of ``batches`` in a random order: full batches of ``size``, and the remainder (or None)."""
    pool = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    rows = len(pool["label"])
    order = torch.randperm(rows, generator=generator).to(pool["label"].device)
    full = rows - rows % size
    out = [{k: v[order[i : i + size]] for k, v in pool.items()} for i in range(0, full, size)]
    rest = {k: v[order[full:]] for k, v in pool.items()} if full < rows else None
    return out, rest


def _evaluate(task, engine, val_shard, train, device, dtype, rank: int, world: int) -> dict[str, float]:
    """Every rank scores every world-th val batch (all of them under ZeRO-3, whose forwards are
    collective); the sums are all-reduced so no rank idles in a barrier while another evaluates."""
    batches = val_shard.iter_torch_batches(batch_size=train.eval_batch_size, device=device)
    if train.zero_stage != 3:
        batches = (b for i, b in enumerate(batches) if i % world == rank)
    sums = task.evaluate(engine, batches, dtype)
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if train.zero_stage != 3:
        torch.distributed.all_reduce(totals)
    totals = dict(zip(keys, totals.tolist()))
    n = totals.pop("n")
    return {k: v / n for k, v in totals.items()} if n else {}


def weights_checksum(state: dict[str, torch.Tensor]) -> float:
    """A cheap fingerprint of a state dict (sum of |w|) to tell restored weights from fresh ones."""
    return float(sum(v.detach().double().abs().sum() for v in state.values() if v.is_floating_point()))


def _save_final(engine, path: str, rank: int, zero_stage: int, ema=None) -> None:
    """The final weights: the EMA's when one is kept (as timm's train script keeps its best), else the model's."""
    from safetensors.torch import save_file

    if ema is not None:
        state = ema.module.state_dict()
    elif zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if rank == 0:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, path)
