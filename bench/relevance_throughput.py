"""Relevance stage throughput: Ray Data (read -> decode tasks -> attribution actors -> Parquet)
against a plain single-process loop over the same shards, teacher and batch size.

    python bench/relevance_throughput.py [--images 4096] [--size 64] [--batch 128] [--actors 1 2] [--loop-threads 1 2]

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
from _common import print_table, write_result
from safetensors.torch import save_file

import zoomvit.models  # noqa: F401
from zoomvit.config import DataConfig, RelevanceConfig, TeacherConfig
from zoomvit.data.decode import ImageTransform, decode_sample, iter_tar_samples
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.relevance import relevance_maps
from zoomvit.relevance.job import run_relevance_stage


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
    parser.add_argument(
        "--loop-threads", type=int, nargs="+", default=[1, 2], help="torch threads of the plain loop (one row each)"
    )
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--ablate", action="store_true", help="add the fused-decode and single-thread variants")
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
    loops = {}
    for threads in args.loop_threads:
        torch.set_num_threads(threads)
        loops[threads] = plain_loop(shards, teacher, size=args.size, batch=args.batch, mean=data.mean, std=data.std)
    best_loop = max(loops.values())
    for threads, ips in loops.items():
        rows.append(
            {
                "runner": f"plain loop, {threads} thread(s)",
                "img_per_s": ips,
                "ratio_vs_best_loop": ips / best_loop,
                "wall_s": args.images / ips,
                "stage_img_per_s": ips,
            }
        )

    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    variants = [(f"Ray Data, {a} actor(s)", {"concurrency": a}) for a in args.actors]
    cpus = int(ray.cluster_resources()["CPU"])
    if not args.use_gpu and cpus > 1:  # one single-threaded decode+attribution actor per core; reads keep 1 CPU
        per_actor = (cpus - 1) / cpus
        variants.append(
            (
                f"Ray Data, {cpus} actors x 1 thread, decoding their own rows",
                {"concurrency": cpus, "num_cpus_per_actor": per_actor, "actor_threads": 1, "decode_in_actor": True},
            )
        )
    if args.ablate:
        variants.append(
            ("Ray Data, 1 actor, decode fused into it, 1 thread", {"decode_num_cpus": 1.0, "actor_threads": 1})
        )
        variants.append(("Ray Data, 1 actor, pipelined decode, 1 thread", {"actor_threads": 1}))
    for name, overrides in variants:
        cfg = RelevanceConfig(
            batch_size=args.batch, shards_per_group=2, splits=("train",), use_gpu=args.use_gpu, **overrides
        )
        out = work / f"ray-{len(rows)}"
        start = time.perf_counter()
        manifest = run_relevance_stage(
            data=data, teacher=TeacherConfig(model=args.teacher, checkpoint=str(ckpt)), relevance=cfg, out_dir=out
        )
        wall = time.perf_counter() - start
        ips = manifest["rows"] / wall
        steady = manifest["stats"]["images_per_s"]
        rows.append(
            {
                "runner": name,
                "img_per_s": ips,
                "ratio_vs_best_loop": ips / best_loop,
                "wall_s": wall,
                "stage_img_per_s": steady,
            }
        )
    print_table(rows)
    path = write_result("relevance_throughput", {"args": vars(args), "rows": rows, "shards": len(shards)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
