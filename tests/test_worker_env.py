"""The training worker without Ray: the class Ray Train runs (``WorkerTrainer``) driven from a plain
script with in-memory batches, through DeepSpeed on the CPU (gloo, a world of one); it trains,
reports, checkpoints and resumes as under Ray Train."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zoomvit.config import load_config
from zoomvit.train.loop import WorkerConfig, WorkerTrainer, weights_checksum
from zoomvit.train.recipes import baseline_task
from zoomvit.train.worker_env import TensorShard, local_env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pathlib import Path

    config = load_config(str(Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "tiny.yaml"))
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
