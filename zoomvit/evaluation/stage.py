"""The evaluate stage: ZoomViT and the baselines side by side on the val shards.

Accuracy overall, by object-size bucket (from the ``.json`` boxes) and by stratum (the ``.json``'s
``stratum``, when the data has one) with 95% bootstrap intervals, tokens/img, GFLOPs/img over every
val image (each image alone, and as batches padded to their longest sequence; the Zoomer included),
inference img/s, and figures. Each baseline reads the val images decoded at its own input size
(``input_size``), and its outcomes are paired with ZoomViT's by sample key. Zoom controls with
ZoomViT's own weights and token counts (:mod:`zoomvit.evaluation.controls`). With a baseline family
(``baseline.input_sizes``), the reported ZoomViT against the family interpolated at its GFLOPs,
paired over the same images, overall and within each bucket and stratum at that part's own mean
GFLOPs (``equal_gflops`` in evaluation.json).
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
from zoomvit.evaluation.controls import CONTROLS, control_row, control_scores, matched_scores, nearest_2x
from zoomvit.evaluation.figures import frontier_figure, layouts_figure, pyplot, size_figure
from zoomvit.evaluation.stats import bootstrap_ci, paired_delta_at_equal_gflops
from zoomvit.models import zoomvit_flops
from zoomvit.models.flops import TokenCostTable, selector_gflops, uniform_tokens
from zoomvit.train.data import DecodedSplits, numpy_batch_input, sample_dataset, size_bucket
from zoomvit.train.objectives import load_trained
from zoomvit.train.recipes import baseline_input_sizes, baseline_tasks, zoomvit_task


class _Scores:
    """One row's per-image outcomes, in the main pass's val order."""

    def __init__(self) -> None:
        self.hits: list[np.ndarray] = []
        self.top5: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []  # each image's token count
        self.zoomed: list[np.ndarray] = []  # each image's zoomed cells
        self.seconds = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, tokens: np.ndarray, seconds: float, zoomed=None) -> None:
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.hits.append((top5[:, 0] == labels).numpy())
        self.top5.append((top5 == labels[:, None]).any(dim=1).numpy())
        self.counts.append(np.asarray(tokens))
        self.zoomed.append(np.zeros(len(labels)) if zoomed is None else np.asarray(zoomed))
        self.seconds += seconds

    def all_hits(self) -> np.ndarray:
        return np.concatenate(self.hits).astype(np.float64)

    def all_counts(self) -> np.ndarray:
        return np.concatenate(self.counts).astype(np.float64)

    def all_zoomed(self) -> np.ndarray:
        return np.concatenate(self.zoomed).astype(np.float64)

    def aligned(self, order: np.ndarray) -> _Scores:
        """The same outcomes reordered (``order``: for each image of the main pass, its index here)."""
        out = _Scores()
        out.hits = [np.concatenate(self.hits)[order]]
        out.top5 = [np.concatenate(self.top5)[order]]
        out.counts = [np.concatenate(self.counts)[order]]
        out.zoomed = [np.concatenate(self.zoomed)[order]]
        out.seconds = self.seconds
        return out

    def row(self, parts: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
        hits = self.all_hits()
        n = len(hits)
        row = {
            **extra,
            "top1": float(hits.mean()),
            "top1_ci95": list(bootstrap_ci(hits)),
            "top5": float(np.concatenate(self.top5).mean()),
            "tokens_per_img": float(self.all_counts().mean()),
            "zoomed_cells_per_img": float(self.all_zoomed().mean()),
            "img_per_s": n / self.seconds if self.seconds else 0.0,
            "n": n,
        }
        for name, keep in parts.items():
            row[f"top1_{name}"] = float(hits[keep].mean())
            row[f"top1_{name}_ci95"] = list(bootstrap_ci(hits[keep]))
        return row


def _parts(buckets: list[str], strata: list[str]) -> dict[str, np.ndarray]:
    """Masks of the images in each object-size bucket (``size_<bucket>``) and stratum (``stratum_<name>``)."""
    buckets_N, strata_N = np.asarray(buckets), np.asarray(strata)
    parts = {f"size_{b}": buckets_N == b for b in sorted(set(buckets))}
    parts |= {f"stratum_{s}": strata_N == s for s in sorted(set(strata)) if s}
    return parts


@torch.no_grad()
def _own_size_pass(config: PipelineConfig, size: int, models: dict[str, torch.nn.Module], splits, keys: list[str]):
    """Baselines that read the val images decoded at ``size``: their scores, aligned to ``keys``."""
    scores = {name: _Scores() for name in models}
    seen: list[str] = []
    data = config.data.at_size(size)
    val = sample_dataset(data, "val", splits=splits)
    for batch in val.iter_batches(batch_size=config.baseline.train.eval_batch_size, batch_format="numpy"):
        x = numpy_batch_input(batch, data)
        labels = torch.tensor(batch["label"], dtype=torch.long)
        seen.extend(str(k) for k in batch["key"])
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(x)
            scores[name].add(logits, labels, np.full(len(x), uniform_tokens(model)), time.perf_counter() - start)
    index = {k: i for i, k in enumerate(seen)}
    missing = [k for k in keys if k not in index]
    if missing or len(seen) != len(keys):
        raise ValueError(
            f"the val split decoded at {size} px holds other samples than at {config.data.image_size} px "
            f"({len(seen)} vs {len(keys)}; e.g. missing {missing[:3]}): outcomes cannot be paired"
        )
    order = np.asarray([index[k] for k in keys])
    return {name: s.aligned(order) for name, s in scores.items()}


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
    tasks, sizes = baseline_tasks(config), baseline_input_sizes(config)
    baselines = {name: load_trained(tasks[name], weights) for name, weights in baseline_weights.items()}
    size_of = {name: sizes.get(name) or config.data.image_size for name in baselines}
    here = {n: m for n, m in baselines.items() if size_of[n] == config.data.image_size}
    headline = config.zoomvit.alpha if alpha is None else alpha
    alphas = [headline, *[a for a in config.evaluate.alphas if a != headline]]
    budgets = list(config.evaluate.budgets)
    scores = {("zoomvit", a): _Scores() for a in alphas} | {("zoomvit_budget", k): _Scores() for k in budgets}
    scores |= {(name, None): _Scores() for name in here}
    teacher = _val_maps(relevance_dir, zoom.grid)
    controls = [c for c in CONTROLS if (c != "teacher" or teacher is not None) and (c != "upsample" or highres)]
    control_generator = torch.Generator().manual_seed(0)
    cost = TokenCostTable(zoom)  # GFLOPs by token count and zoomed cells, over every val image
    fixed_gflops: dict[str, float] = {}  # the Zoomer (and detail gate) and each baseline: one cost for every image
    batch_size = config.zoomvit.train.eval_batch_size
    figure_rows: list[dict[str, Any]] = []
    keys: list[str] = []
    buckets: list[str] = []
    strata: list[str] = []
    size = config.data.image_size
    val = sample_dataset(config.data, "val", highres=highres, splits=splits)
    for batch in val.iter_batches(batch_size=batch_size, batch_format="numpy"):
        x = numpy_batch_input(batch, config.data)
        x_hr = numpy_batch_input(batch, config.data, "image_hr") if highres else None
        if not fixed_gflops:
            fixed_gflops = {"zoomer": selector_gflops(zoom, x, x_hr)}
            fixed_gflops |= {
                name: zoomvit_flops(base, torch.zeros(1, 3, size_of[name], size_of[name])).gflops
                for name, base in baselines.items()
            }
        labels = torch.tensor(batch["label"], dtype=torch.long)
        batch_keys = [str(k) for k in batch["key"]]
        keys.extend(batch_keys)
        buckets.extend(size_bucket(batch["box"], size, config.evaluate.size_buckets))
        strata.extend(str(s) for s in batch["stratum"])
        start = time.perf_counter()
        importance = zoom.importance(x, x_hr)
        zoomer_seconds = time.perf_counter() - start
        for a in alphas:
            start = time.perf_counter()
            logits, zt = zoom(x, importance, highres=x_hr, alpha=a, return_tokens=True)
            scores[("zoomvit", a)].add(
                logits, labels, zt.num_tokens_B.numpy(), zoomer_seconds + time.perf_counter() - start,
                zt.zoomed_cells_B.numpy(),
            )  # fmt: skip
            cost.observe(x, importance, zt.num_tokens_B, zt.zoomed_cells_B, highres=x_hr, alpha=a)
            if a != headline:
                continue
            for kind in controls:
                start = time.perf_counter()
                if kind == "upsample":
                    c_scores, c_hr = importance, nearest_2x(x)
                else:
                    maps = torch.from_numpy(np.stack([teacher[k] for k in batch_keys])) if kind == "teacher" else None
                    ranking = control_scores(
                        kind, tuple(importance.shape), generator=control_generator, teacher_BHW=maps,
                        box_B4=torch.tensor(batch["box"]), image_size=size,
                    )  # fmt: skip
                    c_scores, c_hr = matched_scores(importance, ranking), x_hr
                c_logits, c_zt = zoom(x, c_scores, highres=c_hr, alpha=a, return_tokens=True)
                scores.setdefault(("control", kind), _Scores()).add(
                    c_logits, labels, c_zt.num_tokens_B.numpy(), time.perf_counter() - start,
                    c_zt.zoomed_cells_B.numpy(),
                )  # fmt: skip
                cost.observe(x, c_scores, c_zt.num_tokens_B, c_zt.zoomed_cells_B, highres=c_hr, alpha=a)
            for i in range(min(len(x), config.evaluate.num_figures - len(figure_rows))):
                figure_rows.append(
                    {
                        "key": batch_keys[i],
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
            scores[("zoomvit_budget", budget)].add(
                logits, labels, zt.num_tokens_B.numpy(), seconds, zt.zoomed_cells_B.numpy()
            )
            cost.observe(x, importance, zt.num_tokens_B, zt.zoomed_cells_B, highres=x_hr, token_budget=budget)
        for name, base in here.items():
            start = time.perf_counter()
            logits = base(x)
            scores[(name, None)].add(logits, labels, np.full(len(x), uniform_tokens(base)), time.perf_counter() - start)
    if not fixed_gflops:
        raise ValueError("the val split holds no usable samples")
    for s in sorted({size_of[n] for n in baselines} - {size}):
        own = _own_size_pass(config, s, {n: m for n, m in baselines.items() if size_of[n] == s}, splits, keys)
        scores |= {(name, None): result for name, result in own.items()}
    parts = _parts(buckets, strata)
    executed = _executed_cost(zoom)
    rows = []
    for (model, setting), s in scores.items():
        if model in ("zoomvit", "zoomvit_budget", "control"):
            counts, zoomed = s.all_counts(), s.all_zoomed()
            # a control's cells cost no Zoomer, except upsample's (ZoomViT's own cells)
            zoomer = fixed_gflops["zoomer"] if model != "control" or setting == "upsample" else 0.0
            gflops = {
                "gflops_per_img": cost.unpadded(counts, zoomed) + zoomer,
                "gflops_padded_per_img": cost.padded(counts, zoomed, batch_size) + zoomer,
            }
            gflops["gflops_executed_per_img"] = gflops[
                "gflops_padded_per_img" if executed == "padded" else "gflops_per_img"
            ]
        else:
            gflops = {
                k: fixed_gflops[model] for k in ("gflops_per_img", "gflops_padded_per_img", "gflops_executed_per_img")
            }
        if model == "zoomvit":
            rows.append(s.row(parts, model="zoomvit", alpha=setting, headline=setting == headline, **gflops))
        elif model == "zoomvit_budget":
            rows.append(s.row(parts, model="zoomvit", alpha=None, budget=setting, headline=False, **gflops))
        elif model == "control":
            rows.append(s.row(parts, model=control_row(setting), alpha=headline, headline=False, **gflops))
        else:
            family = model == "baseline" or model in {m.name for m in config.baseline.family}
            rows.append(s.row(parts, model=model, alpha=None, family=family, input_size=size_of[model], **gflops))
    zoom_scores = scores[("zoomvit", headline)]
    result = {
        "rows": rows,
        "size_buckets": list(config.evaluate.size_buckets),
        "parts": {name: int(keep.sum()) for name, keep in parts.items()},
        "cost_as_executed": executed,
        "equal_gflops": _equal_gflops(
            rows, zoom_scores, scores, parts, cost, fixed_gflops["zoomer"], None if executed == "packed" else batch_size
        ),
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
            pyplot().close(fig)
    return result


def _executed_cost(model: torch.nn.Module) -> str:
    """How the evaluated ZoomViT ran its variable-length batches here: ``packed`` (each image's own
    tokens) or ``padded`` (every image of a batch at its longest); the cost compared is that one."""
    on_cuda = next(model.parameters()).is_cuda
    return "packed" if model.sequences == "packed" or (model.sequences == "auto" and on_cuda) else "padded"


def _equal_gflops(
    rows: list[dict[str, Any]],
    zoom_scores: _Scores,
    scores: dict,
    parts: dict[str, np.ndarray],
    cost: TokenCostTable,
    zoomer_gflops: float,
    padded_batch: int | None,
) -> dict[str, Any]:
    """The reported ZoomViT against the baseline family at its GFLOPs as executed (padded to each
    batch's longest where it pads, ``padded_batch``): overall at its mean, and within each bucket and
    stratum at ZoomViT's mean over that part's images (recorded with its tokens). ``bracket_ratio``: how
    far apart, in GFLOPs, the two members are that the comparison interpolates between."""
    gflops = {r["model"]: r["gflops_per_img"] for r in rows if r.get("family")}
    hits = {name: scores[(name, None)].all_hits() for name in gflops}
    zoom_hits, counts = zoom_scores.all_hits(), zoom_scores.all_counts()
    per_image = cost.per_image(counts, zoom_scores.all_zoomed(), padded_batch) + zoomer_gflops
    out: dict[str, Any] = {"family": sorted(gflops, key=gflops.get)}
    for name, keep in {"all": np.ones(len(zoom_hits), dtype=bool), **parts}.items():
        if not keep.any():
            continue
        at = float(per_image[keep].mean())
        delta = paired_delta_at_equal_gflops(zoom_hits[keep], at, [(g, hits[n][keep]) for n, g in gflops.items()])
        out[name] = (
            None
            if delta is None
            else {
                **delta,
                "zoomvit_gflops": at,
                "zoomvit_tokens": float(counts[keep].mean()),
                "bracket_ratio": delta["baseline_gflops"][1] / delta["baseline_gflops"][0],
            }
        )
        if name == "all":
            out["zoomvit_gflops"] = at
    return out


def _val_maps(relevance_dir: str | Path | None, grid: tuple[int, int]) -> dict[str, np.ndarray] | None:
    """The teacher's val relevance maps on ZoomViT's grid, by key (None without a relevance stage)."""
    if relevance_dir is None:
        return None
    from zoomvit.train.data import relevance_targets

    targets = relevance_targets(relevance_dir, "val", tuple(grid))
    return dict(zip(targets["keys"].tolist(), targets["maps"]))
