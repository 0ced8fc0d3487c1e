"""Training throughput on Ray Train + DeepSpeed: ZoomViT vs the baseline at equal tokens, ZeRO-0 vs
ZeRO-2, 1 vs 2 workers (scaling efficiency).

    python bench/train_throughput.py [--images 2048] [--epochs 2]

Demo-sized models on 64 px demo images. ZoomViT runs with alpha above every Zoomer score, i.e. the
baseline's 64 uniform tokens (what remains is the zoom tokenizer's and the Zoomer's cost), and in
token-budget mode with 64 + 3*8 tokens. Every worker gets one CPU; img/s is the last epoch's
(`train_img_per_s` of the training history, all workers together), so Ray Train and DeepSpeed
start-up are excluded. Scaling efficiency = img/s(2 workers) / (2 x img/s(1 worker)).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import log_to_mlflow, print_table, write_result

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    import ray

    from zoomvit.config import load_config
    from zoomvit.data.demo import generate_demo_dataset
    from zoomvit.train.data import sample_dataset
    from zoomvit.train.recipes import baseline_task, zoomvit_task
    from zoomvit.train.trainer import run_training

    work = Path(tempfile.mkdtemp(prefix="trainbench-"))
    generate_demo_dataset(work / "data", train=args.images, val=256, image_size=64, samples_per_shard=512)
    config = load_config(str(REPO / "pipelines" / "configs" / "demo.yaml"), [f"data.root={work / 'data'}"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    train_ds, val_ds = (
        sample_dataset(config.data, "train").materialize(),
        sample_dataset(config.data, "val").materialize(),
    )

    from safetensors.torch import save_file

    from zoomvit.models import Zoomer

    zoomer = work / "zoomer.safetensors"  # throughput only: which cells a Zoomer picks does not change the cost
    save_file(
        Zoomer(grid=(8, 8), width=config.zoomer.width, depth=config.zoomer.depth, head=config.zoomer.head).state_dict(),
        str(zoomer),
    )
    uniform = zoomvit_task(config, zoomer).model_copy(update={"alpha": 1.01, "train_alpha": (1.01, 1.01)})
    budget = zoomvit_task(config, zoomer).model_copy(update={"token_budget": 64 + 3 * 8, "train_budget": (88, 88)})
    cases = [
        ("baseline", baseline_task(config), 0, 1),
        ("baseline", baseline_task(config), 2, 1),
        ("baseline", baseline_task(config), 0, 2),
        ("baseline", baseline_task(config), 2, 2),
        ("zoomvit, 64 uniform tokens", uniform, 2, 1),
        ("zoomvit, 64 uniform tokens", uniform, 2, 2),
        ("zoomvit, budget 88 tokens", budget, 2, 2),
    ]
    rows = []
    for i, (name, task, zero, workers) in enumerate(cases):
        recipe = config.baseline.train.model_copy(
            update={
                "epochs": args.epochs,
                "zero_stage": zero,
                "num_workers": workers,
                "cpus_per_worker": 1.0,
                "batch_size": args.batch,
                "max_failures": 0,
            }
        )
        result = run_training(
            name=f"bench{i}", task=task, train=recipe, train_ds=train_ds, val_ds=val_ds, out_dir=work / f"run{i}"
        )
        last = result.history[-1]
        rows.append(
            {
                "model": name,
                "zero": zero,
                "workers": workers,
                "img_per_s": last["train_img_per_s"],
                "val_tokens_per_img": last["val_tokens_per_img"],
            }
        )
        print(rows[-1], flush=True)

    def ips(model, zero, workers):
        return next(
            r["img_per_s"] for r in rows if r["model"] == model and r["zero"] == zero and r["workers"] == workers
        )

    summary = {
        "scaling_efficiency_baseline_zero0": ips("baseline", 0, 2) / (2 * ips("baseline", 0, 1)),
        "scaling_efficiency_baseline_zero2": ips("baseline", 2, 2) / (2 * ips("baseline", 2, 1)),
        "scaling_efficiency_zoomvit_zero2": ips("zoomvit, 64 uniform tokens", 2, 2)
        / (2 * ips("zoomvit, 64 uniform tokens", 2, 1)),
        "zero2_vs_zero0_2workers": ips("baseline", 2, 2) / ips("baseline", 0, 2),
        "zoomvit_vs_baseline_equal_tokens_2workers": ips("zoomvit, 64 uniform tokens", 2, 2) / ips("baseline", 2, 2),
    }
    print_table(rows)
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    payload = {"args": vars(args), "rows": rows, "summary": summary}
    print(f"wrote {write_result('train_throughput', payload)}")
    if not args.no_mlflow:
        log_to_mlflow("train_throughput", params=vars(args), metrics=summary, artifact=payload)


if __name__ == "__main__":
    main()
