"""The paper's mechanism and its options side by side on the demo recipe (one run, one seed, the same data):

- the Zoomer's head, ``global`` (official) vs ``local``; and the Zoomer trained on whole images vs on
  the random resized crops ZoomViT shows it: val Pearson and top-25% overlap with the teacher on
  whole val images and on random crops of them;
- ZoomViT zooming into ``upsample/nearest`` (official) vs ``upsample/bilinear`` vs ``highres`` pixels:
  top-1, smallest-object top-1, tokens and GFLOPs per image, at the demo's alpha.

    python bench/zoom_variants.py [--epochs 3] [--set KEY=VALUE ...]

The demo data are generated at twice the model's input (128 px for the 64 px model) so ``highres``
has real pixels to read; every variant reads the same shards (``upsample`` variants decode them at 64 px).
The teacher, relevance maps, baseline and the global Zoomer are computed once and shared through the
pipeline's cache. Writes bench/results/zoom_variants.json and logs it to MLflow. Single seed: the
differences it shows are measured, not established (see bench/tradeoff.py for seeds and intervals).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import log_to_mlflow, print_table, write_result

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "pipelines" / "configs" / "demo.yaml"))
    parser.add_argument("--data-root", default=str(REPO / "demo_data" / "demo128"))
    parser.add_argument("--artifact-root", default=str(REPO / "runs"))
    parser.add_argument("--epochs", type=int, default=None, help="ZoomViT/baseline epochs (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    from zoomvit.config import load_config
    from zoomvit.pipeline.runner import run_pipeline
    from zoomvit.pipeline.runtime import init_ray

    init_ray()
    base = [
        f"data.root={args.data_root}",
        "data.demo.image_size=128",
        "data.image_size=64",
        f"artifact_root={args.artifact_root}",
        *([f"zoomvit.train.epochs={args.epochs}", f"baseline.train.epochs={args.epochs}"] if args.epochs else []),
        *args.set,
    ]

    def run(extra: list[str], only: tuple[str, ...] = ()) -> tuple[object, float]:
        start = time.perf_counter()
        result = run_pipeline(load_config(args.config, [*base, *extra]), only=only)
        return result, time.perf_counter() - start

    def manifest(result, stage: str) -> dict:
        return json.loads((Path(result.stages[stage]["out_dir"]) / "manifest.json").read_text())

    zoomer_rows, zoomvit_rows, seconds = [], [], {}
    zoomers = {
        "global, crops (default)": [],
        "local, crops": ["zoomer.head=local"],
        "global, whole images": ["zoomer.train.random_resized_crop=null"],
    }
    first = None
    for name, extra in zoomers.items():
        result, seconds[f"zoomer {name}"] = run(extra, () if first is None else ("zoomer",))
        first = first or result
        m = manifest(result, "zoomer")["metrics"]
        zoomer_rows.append(
            {
                "zoomer": name,
                "val_pearson": m["val_pearson"],
                "val_top25_overlap": m["val_topk_overlap"],
                "val_crop_pearson": m["val_crop_pearson"],
                "val_crop_top25_overlap": m["val_crop_topk_overlap"],
            }
        )
    variants = {
        "upsample/nearest (official)": ["zoomvit.zoom_source=upsample", "zoomvit.zoom_resample=nearest"],
        "upsample/bilinear": ["zoomvit.zoom_source=upsample", "zoomvit.zoom_resample=bilinear"],
        "highres (2x pixels)": ["zoomvit.zoom_source=highres"],
    }
    baseline_row = None
    for name, extra in variants.items():
        result, seconds[f"zoomvit {name}"] = run(extra)
        rows = json.loads((Path(result.stages["evaluate"]["out_dir"]) / "evaluation.json").read_text())["rows"]
        row = next(r for r in rows if r["model"] == "zoomvit" and r["headline"])
        smallest = sorted(k for k in row if k.startswith("top1_size_lt"))[0]
        zoomvit_rows.append(_row(name, row, smallest, manifest(result, "zoomvit")))
        baseline_row = baseline_row or _row(
            "baseline (uniform P)",
            next(r for r in rows if r["model"] == "baseline"),
            smallest,
            manifest(result, "baseline"),
        )
    zoomvit_rows.append(baseline_row)

    print_table(zoomer_rows)
    print()
    print_table(zoomvit_rows)
    payload = {
        "args": vars(args),
        "zoomer": zoomer_rows,
        "zoomvit": zoomvit_rows,
        "seconds": seconds,
        "pipeline_run": first.run_id,
    }
    print(f"wrote {write_result('zoom_variants', payload)}")
    if not args.no_mlflow:
        metrics = {f"zoomer_{_slug(r['zoomer'])}_val_pearson": r["val_pearson"] for r in zoomer_rows}
        metrics |= {f"top1_{_slug(r['variant'])}": r["top1"] for r in zoomvit_rows}
        log_to_mlflow(
            "zoom_variants", params={"epochs": args.epochs, "set": args.set}, metrics=metrics, artifact=payload
        )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0])


def _row(name: str, row: dict, smallest: str, manifest: dict) -> dict:
    return {
        "variant": name,
        "top1": row["top1"],
        f"top1_{smallest.removeprefix('top1_')}": row[smallest],
        "tokens_per_img": row["tokens_per_img"],
        "gflops_per_img": row["gflops_per_img"],
        "train_img_per_s": manifest["metrics"].get("train_img_per_s"),
    }


if __name__ == "__main__":
    main()
