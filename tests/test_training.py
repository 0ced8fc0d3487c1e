"""Ray Train + DeepSpeed harness: streamed epochs, and a killed worker replaced (2 CPU workers, gloo). Resuming
from a checkpoint: tests/test_worker_env.py (the worker alone) and tests/test_faults_kill.py (under Ray Train)."""

import threading
import time

import psutil
import pytest
from conftest import TINY

from zoomvit.config import load_config
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.train.data import sample_dataset
from zoomvit.train.recipes import baseline_task, train_teacher
from zoomvit.train.trainer import run_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_demo_dataset(root, train=256, val=64, image_size=32, samples_per_shard=64)
    return load_config(TINY, [f"data.root={root}"])


def train(config, out_dir, **train_overrides):
    recipe = config.baseline.train.model_copy(update={"zero_stage": 2, "num_workers": 2, **train_overrides})
    return run_training(
        name="baseline",
        task=baseline_task(config),
        train=recipe,
        train_ds=sample_dataset(config.data, "train"),
        val_ds=sample_dataset(config.data, "val"),
        out_dir=out_dir,
    )


def test_a_streamed_training_set_is_read_anew_every_epoch_and_sized_by_info_json(config, tmp_path):
    teacher = config.teacher.model_copy(
        update={"train": config.teacher.train.model_copy(update={"epochs": 2, "num_workers": 1})}
    )
    streamed = config.model_copy(
        update={"data": config.data.model_copy(update={"decoded": "streamed"}), "teacher": teacher}
    )
    result = train_teacher(streamed, tmp_path)
    assert result.train_samples == 256  # from _info.json, not from a count of materialised rows
    assert [h["train_images"] for h in result.history] == [256, 256]  # 8 full batches of 32, every epoch


def test_streamed_training_that_leaves_no_cpu_for_decoding_is_refused_instead_of_waiting_forever(config, tmp_path):
    streamed = config.model_copy(
        update={"data": config.data.model_copy(update={"decoded": "streamed"})}
    )  # 2 workers x 1 CPU on 2 CPUs
    with pytest.raises(ValueError, match="leave a CPU free"):
        train_teacher(streamed, tmp_path)


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and "train_fn" in cmd or cmd.startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


def test_a_killed_worker_is_replaced_and_the_run_finishes(config, tmp_path):
    killed: list[str] = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if len(list(tmp_path.glob("ray/baseline/checkpoint_*"))) >= 3:  # earlier ones are surely registered
                workers = _train_workers()
                if workers:
                    killed.append(" ".join(workers[-1].cmdline()))
                    workers[-1].kill()
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = train(config, tmp_path, epochs=12, max_failures=2)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert [h["epoch"] for h in result.history] == list(range(12))
    starts = [h["start_epoch"] for h in result.history if "start_epoch" in h]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] > 0, (
        f"the restarted group must resume, not start over: {starts}, killed {killed}"
    )
    assert result.weights.exists()


def test_each_epoch_yields_full_batches_of_distinct_samples_in_a_new_order():
    import numpy as np
    import ray.data
    import torch

    from zoomvit.config import TrainConfig
    from zoomvit.train.loop import epoch_batches

    ds = ray.data.from_items([{"label": i} for i in range(500)], override_num_blocks=16).materialize()
    recipe = {"batch_size": 32, "shuffle_buffer": 128, "seed": 0}

    def epoch(dataset, index, **overrides):
        batches = list(
            epoch_batches(
                dataset.iterator(),
                TrainConfig(**{**recipe, **overrides}),
                epoch=index,
                rank=0,
                device=torch.device("cpu"),
            )
        )
        assert [len(b["label"]) for b in batches] == [32] * (500 // 32), (
            "full batches only, as many as without shuffling"
        )
        return np.concatenate([b["label"].numpy() for b in batches])

    shuffled = ds.randomize_block_order(seed=0)
    first, second = epoch(shuffled, 0), epoch(shuffled, 1)
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert (first != second).mean() > 0.9 and (first != np.arange(480)).mean() > 0.9
    assert (epoch(ds, 0, shuffle_buffer=0) == np.arange(480)).all(), "shuffle_buffer=0 keeps the read order"
