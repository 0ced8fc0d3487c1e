"""Relevance and Zoomer distillation on the demo data, with a teacher that has learned something.

The teacher is trained briefly in plain torch (a fixture, not the subject); the relevance stage
(Ray Data) and the Zoomer stage (Ray Train + DeepSpeed ZeRO-2, 2 workers) are the real ones.
"""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zoomvit.config import load_config
from zoomvit.data.decode import ImageTransform, decode_sample, iter_tar_samples
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.data.relevance_store import maps_array, read_maps
from zoomvit.data.shards import expand_shards
from zoomvit.relevance import normalize_maps
from zoomvit.relevance.job import run_relevance_stage
from zoomvit.train.objectives import pearson_per_image
from zoomvit.train.recipes import train_zoomer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
TEACHER = {"model": "vit_demo_patch8_64", "model_kwargs": {"embed_dim": 64, "depth": 3, "num_heads": 2}}


def load_split(root, split):
    transform = ImageTransform(image_size=64)
    keys, images, labels, boxes = [], [], [], []
    for shard in expand_shards(f"{split}-*.tar", root=str(root)):
        with open(shard, "rb") as f:
            for sample in iter_tar_samples(f, url=shard):
                decoded, _ = decode_sample(sample, num_classes=10, transform=transform)
                keys.append(decoded.key)
                images.append(decoded.image)
                labels.append(decoded.label)
                boxes.append(decoded.box)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return keys, x, torch.tensor(labels), np.array(boxes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo64")
    # Little clutter so that a teacher trained for seconds already looks at the digit.
    generate_demo_dataset(root, train=1024, val=256, image_size=64, samples_per_shard=256, seed=1, num_clutter=1)
    _, x, y, _ = load_split(root, "train")
    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER["model"], **TEACHER["model_kwargs"])
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=0.05)
    for _ in range(10):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(teacher(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    ckpt = root / "teacher.safetensors"
    save_file(teacher.state_dict(), str(ckpt))
    config = load_config(
        None,
        [
            f"data.root={root}",
            "data.image_size=64",
            f"teacher.model={TEACHER['model']}",
            f"teacher.checkpoint={ckpt}",
            f"teacher.model_kwargs={json.dumps(TEACHER['model_kwargs'])}",
            "relevance.batch_size=128",
            "relevance.shards_per_group=2",
            "zoomvit.model=zoomvit_demo_patch8_64",
            "zoomer.width=16",
            "zoomer.depth=1",
            # trained in the driver (no Ray Train workers), one batch of 64 per step as two workers' 32 each
            "zoomer.train={epochs: 12, batch_size: 64, lr: 0.005, warmup_epochs: 1, random_resized_crop: null, "
            "num_workers: 0, zero_stage: 2}",
        ],
    )
    relevance_dir = root / "relevance"
    run_relevance_stage(data=config.data, teacher=config.teacher, relevance=config.relevance, out_dir=relevance_dir)
    return config, root, relevance_dir


def test_teacher_relevance_is_higher_inside_the_digit_box_than_outside(setup):
    config, root, relevance_dir = setup
    table = read_maps(relevance_dir, "val")
    maps = maps_array(table)
    keys, _, _, boxes = load_split(root, "val")
    box_of = dict(zip(keys, boxes))
    inside_wins = []
    for key, relevance in zip(table["key"].to_pylist(), maps):
        pixels = np.kron(relevance, np.ones((8, 8)))  # the 8x8 grid back to 64x64 pixels
        x0, y0, x1, y1 = (int(round(v)) for v in box_of[key])
        mask = np.zeros_like(pixels, dtype=bool)
        mask[y0:y1, x0:x1] = True
        inside_wins.append(pixels[mask].mean() > pixels[~mask].mean())
    # Maps unrelated to the object win half the time (0.50 +- 0.03 on 256 images); "most images",
    # by a margin well outside that noise:
    assert np.mean(inside_wins) > 0.75


def test_the_zoomer_correlates_with_the_teacher_maps_on_held_out_images(setup, tmp_path):
    config, root, relevance_dir = setup
    result = train_zoomer(config, relevance_dir, tmp_path)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    # The bar: a Zoomer must beat "relevance = brightness" (the strokes are the brightest pixels,
    # which a trivial map already exploits) by a margin on val images it never saw.
    keys, x, _, _ = load_split(root, "val")
    table = read_maps(relevance_dir, "val")
    order = {k: i for i, k in enumerate(table["key"].to_pylist())}
    targets = normalize_maps(torch.from_numpy(maps_array(table)))[[order[k] for k in keys]]
    brightness = F.avg_pool2d(x.mean(1, keepdim=True), 8)[:, 0]
    heuristic = float(pearson_per_image(brightness, targets).mean())
    assert result.metrics["val_pearson"] > max(0.5, heuristic + 0.05), (result.metrics, heuristic)
    # Top-25% cells: a random ranking shares k/N = 0.25 of them with the teacher's.
    assert result.metrics["val_topk_overlap"] > 0.3
