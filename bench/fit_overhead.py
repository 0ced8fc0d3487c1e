"""Where the fixed cost of one Ray Train fit goes: the tiny teacher (``--epochs`` of 256 images, 2
workers, DeepSpeed ZeRO-2 on gloo) trained ``--fits`` times on one local Ray, alternating the Ray Train
controller's poll interval (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: the controller takes one report per
worker per poll, and a worker's next report waits for it), the number of workers (``0``: trained in
the driver, no Ray Train worker actors) and Ray Train's preemption watcher (an actor per fit), with
Ray's own timeline of each fit. Each list is cycled through, fit by fit.

    python bench/fit_overhead.py --fits 4 --polls 2 0.2
    python bench/fit_overhead.py --fits 6 --polls 0.2 --workers 2 1 0
    python bench/fit_overhead.py --fits 6 --polls 0.2 --preemption-watcher 1 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import write_result

from zoomvit.config import load_config
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.train.recipes import train_teacher

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "tiny.yaml"


def phases(events: list[dict], since_us: float) -> dict[str, float]:
    """Seconds per event name in Ray's timeline after ``since_us``, summed over processes (the two
    workers' spans overlap: a name's total can exceed the wall time)."""
    spans: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e["ts"] >= since_us:
            spans[e["name"]] += e["dur"] / 1e6
    return dict(sorted(spans.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--polls", type=float, nargs="+", default=[2.0, 0.2], help="seconds, alternated")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="train.num_workers, alternated")
    parser.add_argument("--name", default="fit_overhead", help="bench/results/<name>.json")
    parser.add_argument("--preemption-watcher", type=int, nargs="+", default=[1], choices=[0, 1], help="alternated")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="fit_overhead_"))  # removed at the end
    generate_demo_dataset(work / "data", train=256, val=64, image_size=32, samples_per_shard=64)
    sets = [f"data.root={work / 'data'}", f"teacher.train.epochs={args.epochs}"]
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    fits = []
    for i in range(args.fits):
        poll = args.polls[i % len(args.polls)]
        workers = args.workers[i % len(args.workers)]
        watcher = args.preemption_watcher[i % len(args.preemption_watcher)]
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = str(watcher)  # propagated like the poll
        config = load_config(str(TINY), [*sets, f"teacher.train.num_workers={workers}"])
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(poll)  # propagated to the controller at fit()
        since_us = time.time() * 1e6
        start = time.perf_counter()
        result = train_teacher(config, work / f"fit{i}")
        wall = time.perf_counter() - start
        epochs = sum(h["train_images"] / h["train_img_per_s"] for h in result.history)  # the epochs' own time
        setting = {"poll_s": poll, "num_workers": workers, "preemption_watcher": watcher}
        timeline = {k: round(v, 2) for k, v in phases(ray.timeline(), since_us).items()}
        fits.append({**setting, "wall_s": round(wall, 2), "epoch_time_s": round(epochs, 2), "timeline_s": timeline})
        print(
            f"fit {i} {setting}: {wall:.1f} s wall, epochs {epochs:.1f} s; {json.dumps(timeline)[:600]}",
            flush=True,
        )
    ray.shutdown()
    shutil.rmtree(work)
    path = write_result(args.name, {"epochs": args.epochs, "ray_init_s": round(ray_init_s, 2), "fits": fits})
    print(f"ray.init {ray_init_s:.1f} s; written to {path}")


if __name__ == "__main__":
    main()
