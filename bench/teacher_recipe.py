"""The teacher's recipe on the demo data: each lever measured by the teacher stage alone (val top-1,
wall time), on the default and the hard preset.

    python bench/teacher_recipe.py [--presets default hard] [--recipes NAME ...]

Every recipe is a set of config overrides on pipelines/configs/demo.yaml (the ``RECIPES`` table);
each runs the teacher stage in its own artifact root so nothing is reused across recipes. Writes
bench/results/teacher_recipe.json. One seed per cell: differences of a few points are noise (the
val split has 512 images: one standard error of a top-1 near 50% is 2.2 points).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import log_to_mlflow, print_table, write_result

REPO = Path(__file__).resolve().parents[1]
T = "teacher.train"
RECIPES: dict[str, list[str]] = {
    "demo (before)": [f"{T}.lr=0.001", f"{T}.random_resized_crop=[0.5, 1.0]"],
    "milder crops": [f"{T}.lr=0.001", f"{T}.random_resized_crop=[0.8, 1.0]"],
    "lr 2e-3, milder crops": [f"{T}.lr=0.002", f"{T}.random_resized_crop=[0.8, 1.0]"],
    "lr 2e-3, no crops": [f"{T}.lr=0.002", f"{T}.random_resized_crop=null"],
    "lr 2e-3, milder crops, 2x data, half epochs": [
        f"{T}.lr=0.002",
        f"{T}.random_resized_crop=[0.8, 1.0]",
        "data.demo.train=8192",
        f"{T}.epochs=3",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "pipelines" / "configs" / "demo.yaml"))
    parser.add_argument("--presets", nargs="+", default=["default"], choices=["default", "hard"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every recipe"
    )
    parser.add_argument("--name", default="teacher_recipe", help="result file name under bench/results")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    from zoomvit.config import load_config
    from zoomvit.pipeline.runner import run_pipeline
    from zoomvit.pipeline.runtime import init_ray

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="teacher-recipe-"))
    rows = []
    for preset in args.presets:
        for name in args.recipes:
            overrides = [f"data.demo.preset={preset}", *RECIPES[name], *args.set]
            train_size = load_config(args.config, overrides).data.demo.train
            overrides += [
                f"data.root={REPO / 'demo_data' / f'teacher-{preset}-{train_size}'}",
                f"artifact_root={work / str(len(rows))}",
                f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            ]
            config = load_config(args.config, overrides)
            start = time.perf_counter()
            result = run_pipeline(config, only=["teacher"])
            seconds = time.perf_counter() - start
            manifest = json.loads((Path(result.stages["teacher"]["out_dir"]) / "manifest.json").read_text())
            metrics = manifest["metrics"]
            rows.append(
                {
                    "preset": preset,
                    "recipe": name,
                    "val_top1": metrics["val_top1"],
                    "train_loss": metrics["train_loss"],
                    "train_images": config.data.demo.train,
                    "epochs": config.teacher.train.epochs,
                    "stage_s": manifest["seconds"],
                    "with_data_s": seconds,  # includes generating the data the first time a root is used
                }
            )
            print(rows[-1], flush=True)
    print_table(rows)
    payload = {"args": vars(args), "recipes": {k: RECIPES[k] for k in args.recipes}, "rows": rows}
    print(f"wrote {write_result(args.name, payload)}")
    if not args.no_mlflow:
        log_to_mlflow(
            args.name,
            params=vars(args),
            metrics={f"{r['preset']}_{i}_val_top1": r["val_top1"] for i, r in enumerate(rows)},
            artifact=payload,
        )


if __name__ == "__main__":
    main()
