"""Relevance stage throughput: Ray Data (read -> decode tasks -> attribution actors -> Parquet)
against a plain single-process loop over the same shards, teacher and batch size.

    python bench/relevance_throughput.py [--images 4096] [--size 64] [--batch 128] [--actors 1 2]

Ray is started before timing; each Ray row is the stage's own wall time (Dataset start-up
included), the loop row reads tars with the same decoder in one process.
"""

from __future__ import annotations

import argparse
import glob
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

import zoomvit.models  # noqa: F401
from _common import print_table, write_result
from zoomvit.config import DataConfig, RelevanceConfig, TeacherConfig
from zoomvit.data.decode import ImageTransform, decode_sample, iter_tar_samples
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.relevance import relevance_maps
from zoomvit.relevance.stage import run_relevance_stage


def plain_loop(shards: list[str], model, *, size: int, batch: int, mean, std) -> float:
    transform = ImageTransform(image_size=size)
    start = time.perf_counter()
    images, labels, n = [], [], 0

    def flush():
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        relevance_maps(model, x, labels_B=torch.tensor(labels))

    for shard in shards:
        with open(shard, "rb") as f:
            for sample in iter_tar_samples(f, url=shard):
                decoded, _ = decode_sample(sample, num_classes=10, transform=transform)
                if decoded is None:
                    continue
                images.append(decoded.image)
                labels.append(decoded.label)
                n += 1
                if len(images) == batch:
                    flush()
                    images, labels = [], []
    if images:
        flush()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--teacher", default="vit_demo_patch8_64")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--use-gpu", action="store_true")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="relbench-"))
    generate_demo_dataset(work / "data", train=args.images, val=0, image_size=args.size, samples_per_shard=512)
    shards = sorted(glob.glob(str(work / "data" / "train-*.tar")))
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, img_size=args.size, num_classes=10).eval()
    ckpt = work / "teacher.safetensors"
    save_file(teacher.state_dict(), str(ckpt))
    data = DataConfig(root=str(work / "data"), image_size=args.size)

    rows = []
    torch.set_num_threads(1)
    loop_1 = plain_loop(shards, teacher, size=args.size, batch=args.batch, mean=data.mean, std=data.std)
    torch.set_num_threads(2)
    loop_2 = plain_loop(shards, teacher, size=args.size, batch=args.batch, mean=data.mean, std=data.std)
    best_loop = max(loop_1, loop_2)
    rows.append({"runner": "plain loop, 1 thread", "img_per_s": loop_1, "ratio_vs_best_loop": loop_1 / best_loop})
    rows.append({"runner": "plain loop, 2 threads", "img_per_s": loop_2, "ratio_vs_best_loop": loop_2 / best_loop})

    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    for actors in args.actors:
        cfg = RelevanceConfig(batch_size=args.batch, concurrency=actors, shards_per_group=2, splits=("train",), use_gpu=args.use_gpu)
        out = work / f"ray-{actors}"
        start = time.perf_counter()
        manifest = run_relevance_stage(data=data, teacher=TeacherConfig(model=args.teacher, checkpoint=str(ckpt)), relevance=cfg, out_dir=out)
        wall = time.perf_counter() - start
        ips = manifest["rows"] / wall
        rows.append({"runner": f"Ray Data, {actors} actor(s)", "img_per_s": ips, "ratio_vs_best_loop": ips / best_loop})
    print_table(rows)
    path = write_result("relevance_throughput", {"args": vars(args), "rows": rows, "shards": len(shards)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
