"""The evaluate stage's figures: the accuracy/GFLOPs frontier, top-1 by object size, zoom layouts."""

from __future__ import annotations

from typing import Any

import numpy as np

from zoomvit.evaluation.controls import row_label
from zoomvit.train.data import size_bucket_names


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frontier_figure(rows: list[dict[str, Any]]):
    """Top-1 (95% bootstrap interval) against GFLOPs/img for every row: ZoomViT's operating points and
    the baseline family as lines, other baselines and the zoom controls as points."""
    plt = pyplot()

    def cost(r):
        return r.get("gflops_executed_per_img", r["gflops_per_img"])

    def errorbar(ax, group, fmt, label):
        group = sorted(group, key=cost)
        x = [cost(r) for r in group]
        y = [100 * r["top1"] for r in group]
        err = [
            [100 * (r["top1"] - r["top1_ci95"][0]) for r in group],
            [100 * (r["top1_ci95"][1] - r["top1"]) for r in group],
        ]
        ax.errorbar(x, y, yerr=err, fmt=fmt, capsize=3, label=label)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    zoom = [r for r in rows if r["model"] == "zoomvit"]
    if zoom:
        errorbar(ax, zoom, "o-", "ZoomViT (operating points), GFLOPs as executed")
        if any(cost(r) != r["gflops_per_img"] for r in zoom):
            ax.scatter(
                [r["gflops_per_img"] for r in zoom],
                [100 * r["top1"] for r in zoom],
                marker="o",
                facecolors="none",
                edgecolors="C0",
                label="ZoomViT, GFLOPs unpadded (each image alone)",
            )
        head = [r for r in zoom if r.get("headline")]
        if head:
            ax.scatter(
                [cost(head[0])],
                [100 * head[0]["top1"]],
                s=160,
                facecolors="none",
                edgecolors="k",
                label="ZoomViT, reported point",
            )
    family = [r for r in rows if r.get("family")]
    if len(family) > 1:
        errorbar(ax, family, "s--", "baseline family (input sizes)")
    for r in rows:
        if r["model"] != "zoomvit" and not (len(family) > 1 and r.get("family")):
            marker = "x" if r["model"].startswith(("zoomvit_control", "zoomvit_oracle")) else "s"
            errorbar(ax, [r], marker, row_label(r["model"]))
    ax.set_xlabel("GFLOPs / image as executed (Zoomer included for ZoomViT)")
    ax.set_ylabel("val top-1 (%), 95% bootstrap interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def size_figure(rows: list[dict[str, Any]], buckets: list[float]):
    """Top-1 per object-size bucket (95% bootstrap intervals) of ZoomViT's reported point, its zoom
    controls and every baseline, as grouped bars."""
    plt = pyplot()
    shown = [r for r in rows if r.get("headline") or (r["model"] != "zoomvit" and r.get("alpha") is None)]
    shown += [r for r in rows if r["model"].startswith(("zoomvit_control", "zoomvit_oracle"))]
    names = [n for n in [*size_bucket_names(tuple(buckets)), "unknown"] if any(f"top1_size_{n}" in r for r in shown)]
    keys = [f"top1_size_{n}" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) + 2), 4.5))
    width = 0.8 / max(len(shown), 1)
    for i, row in enumerate(shown):
        values = [100 * row.get(k, np.nan) for k in keys]
        low = [100 * (row[k] - row[f"{k}_ci95"][0]) if k in row else 0 for k in keys]
        high = [100 * (row[f"{k}_ci95"][1] - row[k]) if k in row else 0 for k in keys]
        x = np.arange(len(keys)) + (i - (len(shown) - 1) / 2) * width
        label = "ZoomViT (reported)" if row["model"] == "zoomvit" else row_label(row["model"])
        ax.bar(x, values, width, yerr=[low, high], capsize=2, label=label)
    ax.set_xticks(range(len(keys)), names)
    ax.set_xlabel("object size (box side / image side)")
    ax.set_ylabel("val top-1 (%), 95% bootstrap interval")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def layouts_figure(rows: list[dict[str, Any]], teacher_maps: dict[str, np.ndarray]):
    """Per image: the image, the teacher's relevance, the Zoomer's scores and the token layout."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    colors = {-1: "tab:blue", 0: "tab:gray", 1: "tab:red"}
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        image = row["image"]
        ax_row[0].imshow(image)
        ax_row[0].set_title(row["key"], fontsize=8)
        teacher = teacher_maps.get(row["key"])
        if teacher is not None:
            ax_row[1].imshow(teacher, cmap="inferno")
        ax_row[1].set_title("teacher relevance", fontsize=8)
        ax_row[2].imshow(row["zoomer"], cmap="inferno", vmin=0, vmax=1)
        ax_row[2].set_title("Zoomer", fontsize=8)
        ax_row[3].imshow(image)
        for (x0, y0, x1, y1), level in zip(row["boxes"], row["levels"]):
            ax_row[3].add_patch(
                Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=0.6, ec=colors[int(level)])
            )
        ax_row[3].set_title(f"{len(row['boxes'])} tokens (red: zoomed)", fontsize=8)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig
