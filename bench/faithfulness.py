"""Perturbation test of the teacher's relevance maps (Chefer et al. 2021).

    python bench/faithfulness.py [--teacher runs/teacher/<fp>/model.safetensors] [--images 512]
                                 [--target predicted|label]

Each map explains the teacher's *predicted* class (Chefer's protocol; ``--target label`` explains
the ground-truth class instead). Patches are removed (set to the dataset mean) in order of
relevance, 10% of the grid per step: positive = most relevant first (a faithful map makes the
target probability fall fast: low AUC), negative = least relevant first (it should hold up: high
AUC). AUC is the mean target probability over the removal fractions 0, 0.1, ..., 0.9 (trapezoid),
per image; the table gives each method's mean with a 95% bootstrap interval, and gradient rollout
minus every other method with a paired bootstrap interval over the same images (significant when it
excludes zero). Methods: gradient rollout, attention rollout, last-layer attention, random. Default
teacher: the newest demo teacher under runs/teacher/ (run the demo first). Logs to MLflow experiment
'zoomvit-bench' unless --no-mlflow.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import numpy as np
import torch
from _common import log_to_mlflow, print_table, write_result

import zoomvit.models  # noqa: F401
from zoomvit.config import load_config
from zoomvit.evaluation import bootstrap_ci
from zoomvit.relevance import relevance_maps
from zoomvit.relevance.teacher import load_teacher
from zoomvit.train.data import to_model_input

METHODS = ("grad_rollout", "rollout", "attention", "random")
REPO = Path(__file__).resolve().parents[1]


def newest_teacher() -> str:
    found = sorted(glob.glob(str(REPO / "runs" / "teacher" / "*" / "model.safetensors")), key=os.path.getmtime)
    if not found:
        raise SystemExit("no demo teacher under runs/teacher/: run `bash scripts/demo.sh` first or pass --teacher")
    return found[-1]


def val_images(config, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from zoomvit.data.decode import ImageTransform, decode_sample, iter_tar_samples
    from zoomvit.data.shards import expand_shards

    transform = ImageTransform(image_size=config.data.image_size)
    images, labels = [], []
    for shard in expand_shards(config.data.val_shards, root=config.data.root):
        with open(shard, "rb") as f:
            for sample in iter_tar_samples(f, url=shard):
                decoded, _ = decode_sample(sample, num_classes=config.data.num_classes, transform=transform)
                if decoded is not None:
                    images.append(decoded.image)
                    labels.append(decoded.label)
                if len(images) == n:
                    break
        if len(images) == n:
            break
    x = to_model_input(torch.from_numpy(np.stack(images)), config.data.mean, config.data.std)
    return x, torch.tensor(labels)


@torch.no_grad()
def perturbation_curve(model, x_BCHW, target_B, order_BN, grid, patch, fractions) -> np.ndarray:
    """Target probability after removing the first ``fraction`` of each image's patch order."""
    B, N = order_BN.shape
    gw = grid[1]
    probs = []
    for fraction in fractions:
        k = int(round(fraction * N))
        masked = x_BCHW.clone()
        if k:
            mask_BN = torch.zeros(B, N, dtype=torch.bool)
            mask_BN.scatter_(1, order_BN[:, :k], True)
            pixel_mask = mask_BN.view(B, 1, grid[0], gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
            masked = masked.masked_fill(pixel_mask, 0.0)  # 0 = the dataset mean after normalisation
        probs.append(model(masked).softmax(1).gather(1, target_B[:, None]).squeeze(1).numpy())
    return np.stack(probs, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "pipelines" / "configs" / "demo.yaml"))
    parser.add_argument("--data-root", default=str(REPO / "demo_data" / "demo"))
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target", choices=["predicted", "label"], default="predicted", help="the class each map explains"
    )
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    config = load_config(args.config, [f"data.root={args.data_root}"])
    teacher_path = args.teacher or newest_teacher()
    model = load_teacher(
        config.teacher.model,
        checkpoint=teacher_path,
        num_classes=config.data.num_classes,
        model_kwargs=dict(config.teacher.model_kwargs),
    )
    x, labels = val_images(config, args.images)
    grid = tuple(model.patch_embed.grid_size)
    patch = model.patch_embed.patch_size[0]
    fractions = np.round(np.arange(0.0, 1.0, 0.1), 2)
    generator = torch.Generator().manual_seed(args.seed)
    curves = {m: {"positive": [], "negative": []} for m in METHODS}
    for start in range(0, len(x), args.batch):
        xb, yb = x[start : start + args.batch], labels[start : start + args.batch]
        if args.target == "predicted":
            with torch.no_grad():
                yb = model(xb).argmax(1)
        for method in METHODS:
            if method == "random":
                scores = torch.rand(len(xb), grid[0] * grid[1], generator=generator)
            else:
                scores = relevance_maps(model, xb, method=method, labels_B=yb).maps_BHW.flatten(1)
            order = scores.argsort(dim=1, descending=True)
            curves[method]["positive"].append(perturbation_curve(model, xb, yb, order, grid, patch, fractions))
            curves[method]["negative"].append(perturbation_curve(model, xb, yb, order.flip(1), grid, patch, fractions))

    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).float().mean())
    rows = []
    auc = {
        m: {
            k: np.trapezoid(np.concatenate(curves[m][k]), fractions, axis=1) / (fractions[-1] - fractions[0])
            for k in curves[m]
        }
        for m in METHODS
    }
    for method in METHODS:
        row = {"method": method}
        for kind in ("positive", "negative"):
            row[f"{kind}_auc"] = float(auc[method][kind].mean())
            row[f"{kind}_auc_ci95"] = [round(v, 4) for v in bootstrap_ci(auc[method][kind], seed=args.seed)]
            if method != "grad_rollout":  # gradient rollout minus this method, paired over images
                diff = auc["grad_rollout"][kind] - auc[method][kind]
                low, high = bootstrap_ci(diff, seed=args.seed)
                row[f"{kind}_grad_rollout_minus"] = float(diff.mean())
                row[f"{kind}_grad_rollout_minus_ci95"] = [round(low, 4), round(high, 4)]
            row[f"{kind}_curve"] = [round(float(v), 4) for v in np.concatenate(curves[method][kind]).mean(0)]
        rows.append(row)
    print(
        f"teacher {teacher_path}: top-1 {accuracy:.3f} on {len(x)} val images; grid {grid}, patch {patch}px; "
        f"maps explain the {args.target} class"
    )
    print_table([{k: v for k, v in r.items() if not k.endswith("curve")} for r in rows])
    others = [r for r in rows if r["method"] != "grad_rollout"]
    verdict = {
        "best_positive": min(rows, key=lambda r: r["positive_auc"])["method"],
        "best_negative": max(rows, key=lambda r: r["negative_auc"])["method"],
        # significant: the paired interval excludes zero in grad rollout's favour
        # (a lower positive AUC, a higher negative AUC)
        "grad_rollout_significantly_better_positive": [
            r["method"] for r in others if r["positive_grad_rollout_minus_ci95"][1] < 0
        ],
        "grad_rollout_significantly_better_negative": [
            r["method"] for r in others if r["negative_grad_rollout_minus_ci95"][0] > 0
        ],
    }
    verdict["target_met"] = all(
        len(verdict[f"grad_rollout_significantly_better_{k}"]) == len(others) for k in ("positive", "negative")
    )
    print(verdict)
    payload = {
        "args": vars(args),
        "teacher": teacher_path,
        "teacher_top1": accuracy,
        "fractions": fractions.tolist(),
        "rows": rows,
        **verdict,
    }
    print(f"wrote {write_result('faithfulness', payload)}")
    if not args.no_mlflow:
        metrics = {f"{r['method']}_{k}": r[k] for r in rows for k in ("positive_auc", "negative_auc")}
        log_to_mlflow(
            "faithfulness",
            params={"images": len(x), "teacher": teacher_path, "target": args.target},
            metrics=metrics,
            artifact=payload,
        )


if __name__ == "__main__":
    main()
