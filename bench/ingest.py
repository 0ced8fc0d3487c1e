"""WebDataset ingest: Ray Data (the project's reader + decode tasks) vs a plain `webdataset`
pipeline in a torch DataLoader, both running the same decoder (`decode_sample`), with 1 and 2 CPUs.

    python bench/ingest.py [--images 8192] [--size 160] [--out-size 128]

Each runner decodes every sample of the same shards into uint8 arrays and hands batches of 64 to
the consumer, which only counts them. Ray rows run in a fresh `ray.init(num_cpus=N)` (start-up not
timed: the Dataset is timed from the first request to the last batch); the loader rows use N
DataLoader worker processes, shards split between them by webdataset.
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import log_to_mlflow, print_table, write_result

RAY_CHILD = """
import sys, time, json
import ray
from ray.data import DataContext
from zoomvit.data.decode import ImageTransform
from zoomvit.data.ingest import read_decoded
cpus, size, shards = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
DataContext.get_current().enable_progress_bars = False
ray.get(ray.remote(lambda: 1).remote())  # workers up
start = time.perf_counter()
n = 0
ds = read_decoded(shards, num_classes=10, transform=ImageTransform(image_size=size), batch_size=64)
for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
    n += int((batch["kind"] == "sample").sum())
print(json.dumps({"images": n, "seconds": time.perf_counter() - start}))
"""


def _decode(sample, transform):
    from zoomvit.data.decode import decode_sample

    decoded, _ = decode_sample(sample, num_classes=10, transform=transform)
    return None if decoded is None else (decoded.image, decoded.label)


def plain_loader(shards: list[str], *, workers: int, size: int) -> tuple[int, float]:
    import functools

    import torch
    import webdataset as wds

    from zoomvit.data.decode import ImageTransform

    transform = ImageTransform(image_size=size)
    pipeline = (
        wds.WebDataset(
            shards, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker, empty_check=False
        )
        .map(functools.partial(_decode, transform=transform))
        .select(lambda x: x is not None)
        .batched(64, collation_fn=None)
    )
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False)
    start = time.perf_counter()
    n = sum(len(batch) for batch in loader)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--size", type=int, default=160, help="stored JPEG side")
    parser.add_argument("--out-size", type=int, default=128, help="decoded side")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    from zoomvit.data.demo import generate_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="ingestbench-"))
    generate_demo_dataset(
        work, train=args.images, val=0, image_size=args.size, samples_per_shard=512, photo_clutter=True
    )
    shards = sorted(glob.glob(str(work / "train-*.tar")))
    rows = []
    for cpus in args.cpus:
        n, seconds = plain_loader(shards, workers=cpus, size=args.out_size)
        loader_ips = n / seconds
        child = subprocess.run(
            [sys.executable, "-c", RAY_CHILD, str(cpus), str(args.out_size), *shards],
            capture_output=True,
            text=True,
            check=True,
        )
        result = __import__("json").loads(child.stdout.strip().splitlines()[-1])
        assert result["images"] == n, (result, n)
        ray_ips = result["images"] / result["seconds"]
        rows.append(
            {
                "cpus": cpus,
                "loader_img_per_s": loader_ips,
                "ray_data_img_per_s": ray_ips,
                "ray_vs_loader": ray_ips / loader_ips,
            }
        )
    if len(rows) == 2:
        for key in ("loader", "ray_data"):
            rows[1][f"{key}_scaling"] = rows[1][f"{key}_img_per_s"] / rows[0][f"{key}_img_per_s"]
    print_table(rows)
    payload = {"args": vars(args), "shards": len(shards), "rows": rows}
    print(f"wrote {write_result('ingest', payload)}")
    if not args.no_mlflow:
        metrics = {f"{k}_{r['cpus']}cpu": v for r in rows for k, v in r.items() if k != "cpus"}
        log_to_mlflow("ingest", params=vars(args), metrics=metrics, artifact=payload)


if __name__ == "__main__":
    main()
