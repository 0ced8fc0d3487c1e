"""The evaluate stage: ZoomViT and the baseline side by side on the val shards.

Accuracy overall and by object-size bucket (from the ``.json`` boxes) with 95% bootstrap intervals,
tokens/img, GFLOPs/img over every val image (each image alone, and as batches padded to their
longest sequence; the Zoomer included), inference img/s, and a figure (image | teacher map | Zoomer map |
token layout). Zoom controls with ZoomViT's own weights: every image zooms as many cells as the
Zoomer chose for it at the reported alpha, but random cells (a fixed seed), the cells nearest the
centre, or the teacher's most relevant cells (the oracle the Zoomer imitates). With a baseline
family (``baseline.input_sizes``), the reported ZoomViT against the family interpolated at its
GFLOPs, paired over the same images (``equal_gflops`` in evaluation.json).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoomvit.config import PipelineConfig
from zoomvit.models import ZOOM, zoomvit_flops
from zoomvit.models.flops import TokenCostTable, count_flops, uniform_tokens
from zoomvit.train.data import DecodedSplits, numpy_batch_input, sample_dataset, size_bucket, size_bucket_names
from zoomvit.train.recipes import baseline_tasks, zoomvit_task
from zoomvit.train.tasks import load_trained


def bootstrap_ci(hits: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image outcomes (0/1 hits, or paired differences)."""
    hits = np.asarray(hits, dtype=np.float64)
    if len(hits) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), size=(resamples, len(hits)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


class _Scores:
    def __init__(self) -> None:
        self.top5 = 0
        self.tokens = 0.0
        self.counts: list[np.ndarray] = []  # each image's token count, in val order
        self.seconds = 0.0
        self.hits: list[np.ndarray] = []
        self.buckets: list[str] = []

    @property
    def n(self) -> int:
        return len(self.buckets)

    def add(
        self, logits: torch.Tensor, labels: torch.Tensor, tokens: np.ndarray, buckets: list[str], seconds: float
    ) -> None:
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.hits.append((top5[:, 0] == labels).numpy())
        self.buckets.extend(buckets)
        self.top5 += int((top5 == labels[:, None]).any(dim=1).sum())
        self.tokens += float(tokens.sum())
        self.counts.append(np.asarray(tokens))
        self.seconds += seconds

    def row(self, **extra: Any) -> dict[str, Any]:
        hits = np.concatenate(self.hits).astype(np.float64)
        buckets = np.asarray(self.buckets)
        row = {
            **extra,
            "top1": float(hits.mean()),
            "top1_ci95": list(bootstrap_ci(hits)),
            "top5": self.top5 / self.n,
            "tokens_per_img": self.tokens / self.n,
            "img_per_s": self.n / self.seconds if self.seconds else 0.0,
            "n": self.n,
        }
        for b in sorted(set(self.buckets)):
            row[f"top1_size_{b}"] = float(hits[buckets == b].mean())
            row[f"top1_size_{b}_ci95"] = list(bootstrap_ci(hits[buckets == b]))
        return row


def paired_delta_at_equal_gflops(
    hits_N: np.ndarray, gflops: float, family: list[tuple[float, np.ndarray]], *, resamples: int = 2000, seed: int = 0
) -> dict[str, Any] | None:
    """ZoomViT's top-1 minus the baseline family's, linearly interpolated to ZoomViT's GFLOPs between
    the two family points that bracket it, with a paired percentile bootstrap over the same images
    (each image's interpolated outcome is ``(1 - w) * hit_low + w * hit_high``). None when no two
    family points bracket ``gflops``: the family is never extrapolated."""
    family = sorted(family, key=lambda point: point[0])
    for (g_low, h_low), (g_high, h_high) in zip(family, family[1:]):
        if g_low <= gflops <= g_high:
            w = 0.0 if g_high == g_low else (gflops - g_low) / (g_high - g_low)
            diff_N = np.asarray(hits_N, np.float64) - ((1 - w) * h_low + w * h_high)
            low, high = bootstrap_ci(diff_N, resamples=resamples, seed=seed)
            return {
                "delta_top1": float(diff_N.mean()),
                "delta_top1_ci95": [low, high],
                "significant": bool(low > 0 or high < 0),
                "baseline_gflops": [g_low, g_high],
                "weight_high": w,
            }
    return None


CONTROLS: tuple[str, ...] = ("random", "centre", "teacher")


def control_scores(
    kind: str, shape_BHW: tuple[int, int, int], *, generator: torch.Generator, teacher_BHW: torch.Tensor | None = None
) -> torch.Tensor:
    """Cell scores whose top-k cells a control zooms: random (seeded), nearest the centre first, or
    the teacher's relevance (the oracle)."""
    B, gh, gw = shape_BHW
    if kind == "random":
        return torch.rand(B, gh, gw, generator=generator)
    if kind == "centre":
        r = torch.arange(gh, dtype=torch.float32)[:, None] - (gh - 1) / 2
        c = torch.arange(gw, dtype=torch.float32)[None, :] - (gw - 1) / 2
        return (-(r**2 + c**2)).expand(B, gh, gw).clone()
    if kind == "teacher":
        assert teacher_BHW is not None
        return teacher_BHW
    raise ValueError(f"unknown control {kind!r}; choose one of {CONTROLS}")


@torch.no_grad()
def evaluate_models(
    config: PipelineConfig,
    *,
    zoomvit_weights: str | Path,
    baseline_weights: str | Path | dict[str, str | Path],
    relevance_dir: str | Path | None,
    out_dir: str | Path,
    alpha: float | None = None,
    splits: DecodedSplits | None = None,
    on_figure: Callable[[Any, str], None] | None = None,
) -> dict[str, Any]:
    """``alpha``: ZoomViT's reported operating point when calibrated (else ``zoomvit.alpha``);
    ``splits``: the run's shared decoded splits; ``on_figure(figure, filename)``: called with each
    matplotlib figure (frontier, top-1 by object size, zoom layouts) once it is saved in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    zoom = load_trained(zoomvit_task(config, None, inference=True), zoomvit_weights)
    highres = config.zoomvit.reads_highres
    if not isinstance(baseline_weights, dict):
        baseline_weights = {"baseline": baseline_weights}
    tasks = baseline_tasks(config)
    baselines = {name: load_trained(tasks[name], weights) for name, weights in baseline_weights.items()}
    headline = config.zoomvit.alpha if alpha is None else alpha
    alphas = [headline, *[a for a in config.evaluate.alphas if a != headline]]
    budgets = list(config.evaluate.budgets)
    scores = {("zoomvit", a): _Scores() for a in alphas} | {("zoomvit_budget", k): _Scores() for k in budgets}
    scores |= {(name, None): _Scores() for name in baselines}
    teacher = _val_maps(relevance_dir, zoom.grid)
    controls = [c for c in CONTROLS if c != "teacher" or teacher is not None]
    scores |= {("control", c): _Scores() for c in controls}
    control_generator = torch.Generator().manual_seed(0)
    cost = TokenCostTable(zoom)  # GFLOPs by token count, over every val image
    fixed_gflops: dict[str, float] = {}  # the Zoomer and each baseline: one cost for every image
    batch_size = config.zoomvit.train.eval_batch_size
    figure_rows: list[dict[str, Any]] = []
    val = sample_dataset(config.data, "val", highres=highres, splits=splits)
    for batch in val.iter_batches(batch_size=batch_size, batch_format="numpy"):
        x = numpy_batch_input(batch, config.data)
        if not fixed_gflops:
            fixed_gflops = {"zoomer": count_flops(zoom.zoomer, x[:1]) / 1e9}
            fixed_gflops |= {name: zoomvit_flops(base, x[:1]).gflops for name, base in baselines.items()}
        x_hr = numpy_batch_input(batch, config.data, "image_hr") if highres else None
        labels = torch.tensor(batch["label"], dtype=torch.long)
        buckets = size_bucket(batch["box"], config.data.image_size, config.evaluate.size_buckets)
        start = time.perf_counter()
        importance = zoom.importance(x)
        zoomer_seconds = time.perf_counter() - start
        for alpha in alphas:
            start = time.perf_counter()
            logits, zt = zoom(x, importance, highres=x_hr, alpha=alpha, return_tokens=True)
            seconds = zoomer_seconds + time.perf_counter() - start
            scores[("zoomvit", alpha)].add(logits, labels, zt.num_tokens_B.numpy(), buckets, seconds)
            cost.observe(x, importance, zt.num_tokens_B, highres=x_hr, alpha=alpha)
            if alpha == headline:
                budget_B = zoom.num_cells + 3 * ((zt.level_BL == ZOOM) & zt.valid_BL).sum(dim=1) // 4
                keys = [str(k) for k in batch["key"]]
                for kind in controls:
                    maps = None if kind != "teacher" else torch.from_numpy(np.stack([teacher[k] for k in keys]))
                    chosen = control_scores(
                        kind, tuple(importance.shape), generator=control_generator, teacher_BHW=maps
                    )
                    start = time.perf_counter()
                    c_logits, c_zt = zoom(x, chosen, highres=x_hr, token_budget=budget_B, return_tokens=True)
                    scores[("control", kind)].add(
                        c_logits, labels, c_zt.num_tokens_B.numpy(), buckets, time.perf_counter() - start
                    )
                    cost.observe(x, chosen, c_zt.num_tokens_B, highres=x_hr, token_budget=budget_B)
            if alpha == headline and len(figure_rows) < config.evaluate.num_figures:
                for i in range(min(len(x), config.evaluate.num_figures - len(figure_rows))):
                    figure_rows.append(
                        {
                            "key": str(batch["key"][i]),
                            "image": batch["image"][i],
                            "zoomer": importance[i].numpy(),
                            "boxes": zt.box_BL4[i][zt.valid_BL[i]].numpy(),
                            "levels": zt.level_BL[i][zt.valid_BL[i]].numpy(),
                        }
                    )
        for budget in budgets:
            start = time.perf_counter()
            logits, zt = zoom(x, importance, highres=x_hr, token_budget=budget, return_tokens=True)
            seconds = zoomer_seconds + time.perf_counter() - start
            scores[("zoomvit_budget", budget)].add(logits, labels, zt.num_tokens_B.numpy(), buckets, seconds)
            cost.observe(x, importance, zt.num_tokens_B, highres=x_hr, token_budget=budget)
        for name, base in baselines.items():
            start = time.perf_counter()
            logits = base(x)
            seconds = time.perf_counter() - start
            scores[(name, None)].add(logits, labels, np.full(len(x), uniform_tokens(base)), buckets, seconds)
    if not fixed_gflops:
        raise ValueError("the val split holds no usable samples")
    rows = []
    for (model, setting), s in scores.items():
        if model in ("zoomvit", "zoomvit_budget", "control"):
            counts = np.concatenate(s.counts)
            zoomer = 0.0 if model == "control" else fixed_gflops["zoomer"]  # a control's cells cost no Zoomer
            gflops = {
                "gflops_per_img": cost.unpadded(counts) + zoomer,
                "gflops_padded_per_img": cost.padded(counts, batch_size) + zoomer,
            }
        else:
            gflops = {"gflops_per_img": fixed_gflops[model], "gflops_padded_per_img": fixed_gflops[model]}
        if model == "zoomvit":
            rows.append(s.row(model="zoomvit", alpha=setting, headline=setting == headline, **gflops))
        elif model == "zoomvit_budget":
            rows.append(s.row(model="zoomvit", alpha=None, budget=setting, headline=False, **gflops))
        elif model == "control":
            rows.append(s.row(model=f"zoomvit_control_{setting}", alpha=headline, headline=False, **gflops))
        else:
            family = model == "baseline" or model in {m.name for m in config.baseline.family}
            rows.append(s.row(model=model, alpha=None, family=family, **gflops))
    result = {
        "rows": rows,
        "size_buckets": list(config.evaluate.size_buckets),
        "equal_gflops": _equal_gflops(config, rows, scores, headline),
    }
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    figures = {
        "frontier.png": frontier_figure(rows),
        "top1_by_size.png": size_figure(rows, list(config.evaluate.size_buckets)),
    }
    if figure_rows:
        figures["zoom_layouts.png"] = layouts_figure(figure_rows, teacher or {})
    try:
        for name, fig in figures.items():
            fig.savefig(out_dir / name, dpi=110)
        for name, fig in figures.items() if on_figure is not None else ():
            on_figure(fig, name)
    finally:
        for fig in figures.values():
            _pyplot().close(fig)
    return result


def _equal_gflops(config: PipelineConfig, rows: list[dict[str, Any]], scores: dict, headline: float) -> dict[str, Any]:
    """The reported ZoomViT against the baseline family at its GFLOPs: overall and per size bucket."""
    gflops = {r["model"]: r["gflops_per_img"] for r in rows if r.get("family")}
    zoom = next(r for r in rows if r["model"] == "zoomvit" and r.get("headline"))
    zoom_s = scores[("zoomvit", headline)]
    hits = {"zoomvit": np.concatenate(zoom_s.hits)} | {
        name: np.concatenate(scores[(name, None)].hits) for name in gflops
    }
    buckets = np.asarray(zoom_s.buckets)
    out: dict[str, Any] = {"zoomvit_gflops": zoom["gflops_per_img"], "family": sorted(gflops, key=gflops.get)}
    out["all"] = paired_delta_at_equal_gflops(
        hits["zoomvit"], zoom["gflops_per_img"], [(g, hits[n]) for n, g in gflops.items()]
    )
    for b in sorted(set(buckets)):
        keep = buckets == b
        out[f"size_{b}"] = paired_delta_at_equal_gflops(
            hits["zoomvit"][keep], zoom["gflops_per_img"], [(g, hits[n][keep]) for n, g in gflops.items()]
        )
    return out


def _val_maps(relevance_dir: str | Path | None, grid: tuple[int, int]) -> dict[str, np.ndarray] | None:
    """The teacher's val relevance maps on ZoomViT's grid, by key (None without a relevance stage)."""
    if relevance_dir is None:
        return None
    from zoomvit.train.data import relevance_targets

    targets = relevance_targets(relevance_dir, "val", tuple(grid))
    return dict(zip(targets["keys"].tolist(), targets["maps"]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frontier_figure(rows: list[dict[str, Any]]):
    """Top-1 (95% bootstrap interval) against GFLOPs/img for every row: ZoomViT's operating points and
    the baseline family as lines, other baselines and the zoom controls as points."""
    plt = _pyplot()

    def errorbar(ax, group, fmt, label):
        group = sorted(group, key=lambda r: r["gflops_per_img"])
        x = [r["gflops_per_img"] for r in group]
        y = [100 * r["top1"] for r in group]
        err = [
            [100 * (r["top1"] - r["top1_ci95"][0]) for r in group],
            [100 * (r["top1_ci95"][1] - r["top1"]) for r in group],
        ]
        ax.errorbar(x, y, yerr=err, fmt=fmt, capsize=3, label=label)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    zoom = [r for r in rows if r["model"] == "zoomvit"]
    if zoom:
        errorbar(ax, zoom, "o-", "ZoomViT (operating points)")
        head = [r for r in zoom if r.get("headline")]
        if head:
            ax.scatter(
                [head[0]["gflops_per_img"]],
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
            marker = "x" if r["model"].startswith("zoomvit_control") else "s"
            errorbar(ax, [r], marker, r["model"].replace("zoomvit_control_", "control: "))
    ax.set_xlabel("GFLOPs / image (Zoomer included for ZoomViT)")
    ax.set_ylabel("val top-1 (%), 95% bootstrap interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def size_figure(rows: list[dict[str, Any]], buckets: list[float]):
    """Top-1 per object-size bucket (95% bootstrap intervals) of ZoomViT's reported point, its zoom
    controls and every baseline, as grouped bars."""
    plt = _pyplot()
    shown = [r for r in rows if r.get("headline") or (r["model"] != "zoomvit" and r.get("alpha") is None)]
    shown += [r for r in rows if r["model"].startswith("zoomvit_control")]
    names = [n for n in [*size_bucket_names(tuple(buckets)), "unknown"] if any(f"top1_size_{n}" in r for r in shown)]
    keys = [f"top1_size_{n}" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) + 2), 4.5))
    width = 0.8 / max(len(shown), 1)
    for i, row in enumerate(shown):
        values = [100 * row.get(k, np.nan) for k in keys]
        low = [100 * (row[k] - row[f"{k}_ci95"][0]) if k in row else 0 for k in keys]
        high = [100 * (row[f"{k}_ci95"][1] - row[k]) if k in row else 0 for k in keys]
        x = np.arange(len(keys)) + (i - (len(shown) - 1) / 2) * width
        label = (
            "ZoomViT (reported)" if row["model"] == "zoomvit" else row["model"].replace("zoomvit_control_", "control: ")
        )
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
    plt = _pyplot()
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
