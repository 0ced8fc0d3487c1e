"""The training worker without Ray Train: the class Ray Train runs (``WorkerTrainer``) driven from a
plain script with in-memory batches, and from the driver itself (``train.num_workers=0``) on Ray
Datasets, through DeepSpeed on the CPU (gloo, a world of one); it trains, reports, checkpoints and
resumes as under Ray Train."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from zoomvit.checkpoints import Checkpoints
from zoomvit.config import load_config
from zoomvit.train.loop import WorkerConfig, WorkerTrainer, weights_checksum
from zoomvit.train.recipes import baseline_task
from zoomvit.train.trainer import run_training
from zoomvit.train.worker_env import TensorShard, local_env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):

    config = load_config(TINY)
    task = baseline_task(config)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    labels = rng.integers(0, config.data.num_classes, 32)
    images = np.zeros((32, size, size, 3), np.uint8)
    for i, label in enumerate(labels):  # a class is a bright quadrant: learnable in a few steps
        q = int(label) % 4
        images[i, (q // 2) * size // 2 : (q // 2 + 1) * size // 2, (q % 2) * size // 2 : (q % 2 + 1) * size // 2] = 255
    columns = {"image": images, "label": labels.astype(np.int64)}
    return config, task, columns


def _worker(config, task, epochs: int) -> WorkerConfig:
    train = config.baseline.train.model_copy(update={"epochs": epochs, "batch_size": 8, "num_workers": 1,
                                                     "shuffle_buffer": 0, "warmup_epochs": 0})  # fmt: skip
    return WorkerConfig(name="baseline", task=task, train=train, use_gpu=False, steps_per_epoch=4, tracking=None,
                        verbose=False)  # fmt: skip


def test_the_ray_train_worker_class_trains_from_a_plain_script_and_reports_each_epoch(setup, tmp_path):
    config, task, columns = setup
    env, reports = local_env(TensorShard(columns), TensorShard(columns), device="cpu", keep=tmp_path / "ckpt")
    trainer = WorkerTrainer(_worker(config, task, epochs=2), env)
    assert (trainer.rank, trainer.world, trainer.device.type) == (0, 1, "cpu")
    trainer.fit()
    assert [m["epoch"] for m in reports.metrics] == [0, 1]
    assert all(np.isfinite(m["train_loss"]) and 0 <= m["val_top1"] <= 1 for m in reports.metrics)
    assert (tmp_path / "ckpt" / "model.safetensors").exists(), "the last epoch's checkpoint holds the final weights"

    saved = weights_checksum(load_file(str(tmp_path / "ckpt" / "model.safetensors")))

    env, resumed = local_env(TensorShard(columns), TensorShard(columns), device="cpu", keep=tmp_path / "ckpt")
    again = WorkerTrainer(_worker(config, task, epochs=3), env)
    assert again.start_epoch == 2 and again.history == trainer.history, "resumed from the kept checkpoint"
    again.fit()
    assert [m["epoch"] for m in resumed.metrics] == [2]
    assert resumed.metrics[0]["start_epoch"] == 2
    assert resumed.metrics[0]["start_weights_checksum"] == pytest.approx(saved, rel=1e-9), "the checkpoint's weights"


def test_a_fixed_batch_drives_train_step_and_its_loss_falls(setup):
    config, task, columns = setup
    batch = {k: v[:8] for k, v in columns.items()}
    env, _ = local_env(TensorShard(batch), TensorShard(batch), device="cpu")
    trainer = WorkerTrainer(_worker(config, task, epochs=1), env)
    fixed = next(TensorShard(batch).iter_torch_batches(batch_size=8))
    losses = [trainer.train_step(fixed).item() for _ in range(12)]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_a_tensor_shard_yields_batches_as_ray_data_does():
    shard = TensorShard({"image": np.zeros((10, 4, 4, 3), np.uint8), "label": np.arange(10)}, repeat=2)
    sizes = [len(b["label"]) for b in shard.iter_torch_batches(batch_size=4)]
    assert sizes == [4, 4, 2, 4, 4, 2]
    kept = [b["label"].tolist() for b in shard.iter_torch_batches(batch_size=4, drop_last=True)]
    assert kept == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert next(shard.iter_torch_batches(batch_size=4))["image"].dtype == torch.uint8


def test_zero_workers_train_in_the_driver_and_an_interrupted_run_resumes_from_the_kept_checkpoint(
    ray_local, setup, tmp_path
):
    config, task, columns = setup
    rows = [{"image": image, "label": int(label), "key": f"k{i}", "stratum": ""}
            for i, (image, label) in enumerate(zip(columns["image"], columns["label"]))]  # fmt: skip
    ds = ray_local.data.from_items(rows)
    train = config.baseline.train.model_copy(update={"epochs": 3, "batch_size": 8, "num_workers": 0,
                                                     "shuffle_buffer": 0, "warmup_epochs": 0})  # fmt: skip
    calls = itertools.count()

    def fence() -> None:  # called at set-up and before each checkpoint: the run stops before its second one
        if next(calls) == 2:
            raise RuntimeError("interrupted")

    def fit(fence=None):
        return run_training(name="baseline", task=task, train=train, train_ds=ds, val_ds=ds, out_dir=tmp_path / "out",
                            checkpoints=Checkpoints(str(tmp_path / "ckpt"), fence))  # fmt: skip

    with pytest.raises(RuntimeError, match="interrupted"):
        fit(fence)
    kept = tmp_path / "ckpt" / "driver"
    assert [h["epoch"] for h in json.loads((kept / "history.json").read_text())] == [0]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["driver"], "no Ray Train run: trained in this process"

    result = fit()
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.history[1]["start_epoch"] == 1, "resumed after the kept epoch, not from scratch"
    assert result.train_samples == 32 and result.metrics["epoch"] == 2
    assert result.weights == tmp_path / "out" / "model.safetensors" and result.checkpoint == str(kept)
    assert weights_checksum(load_file(str(result.weights))) == pytest.approx(
        weights_checksum(load_file(str(kept / "model.safetensors")))
    )
    assert not list(tmp_path.glob("ckpt/driver.*")), "no staged or set-aside copy is left"


def test_zero_workers_refuse_a_bucket_checkpoint_location(ray_local, setup, tmp_path):
    config, task, columns = setup
    ds = ray_local.data.from_items([{"image": columns["image"][0], "label": 0, "key": "k", "stratum": ""}] * 16)
    train = config.baseline.train.model_copy(update={"num_workers": 0, "batch_size": 8})
    with pytest.raises(ValueError, match="num_workers=0 trains in the driver .* local path"):
        run_training(name="baseline", task=task, train=train, train_ds=ds, val_ds=ds, out_dir=tmp_path,
                     checkpoints=Checkpoints("s3://bucket/checkpoints"))  # fmt: skip
