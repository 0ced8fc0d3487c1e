"""ZoomViT's operating point calibrated on the held-out calibration slice of the training shards.

A fixed alpha means nothing once the Zoomer's score scale changes (a noisy Zoomer above 0.1
everywhere zooms every cell). Given a target mean token count (or GFLOPs per image), alpha is set so
that the frozen Zoomer's maps over the calibration slice zoom exactly that many cells in total;
training's alpha range follows from the same maps. The val split is never read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from zoomvit.config import PipelineConfig
from zoomvit.models.tokenizer import TOKENS_PER_ZOOMED_CELL
from zoomvit.train.data import DecodedSplits, numpy_batch_input, sample_dataset


def calibrate_alpha(scores_NHW: torch.Tensor, target_tokens: float, tokens_per_cell: int = 3) -> float:
    """The alpha whose layouts of these maps average ``target_tokens`` tokens per image (each
    zoomed cell adds ``tokens_per_cell``)."""
    N, gh, gw = scores_NHW.shape
    cells = gh * gw
    top = cells + tokens_per_cell * cells
    if tokens_per_cell <= 0 or not cells <= target_tokens <= top:
        raise ValueError(f"target of {target_tokens} tokens per image is outside [{cells}, {top}] for a {gh}x{gw} grid")
    return alpha_for_cells(scores_NHW, (target_tokens - cells) / tokens_per_cell)


def alpha_for_cells(scores_NHW: torch.Tensor, mean_cells: float) -> float:
    """The alpha whose layouts of these maps zoom ``mean_cells`` cells per image on average: the
    midpoint between the k-th and (k+1)-th highest score of the slice."""
    N = scores_NHW.shape[0]
    flat = scores_NHW.detach().double().flatten().sort(descending=True).values
    k = int(round(mean_cells * N))
    if k == 0:
        return float(min(1.0, flat[0] + 1e-6))
    if k >= len(flat):
        return float(max(0.0, flat[-1] - 1e-6))
    return float((flat[k - 1] + flat[k]) / 2)


def cells_for_gflops(model, target_gflops: float, image_BCHW: torch.Tensor, highres=None) -> int:
    """The number of zoomed cells whose measured cost (backbone + Zoomer, one image) is closest to
    the target; cost rises with it, so a bisection over 0..cells finds it."""
    from zoomvit.models.flops import count_flops, selector_gflops

    cells = model.num_cells
    zoomer = selector_gflops(model, image_BCHW, highres)
    scores = torch.rand(1, *model.grid)

    measured: dict[int, float] = {}

    def cost(k: int) -> float:
        if k not in measured:
            measured[k] = zoomer + count_flops(model, image_BCHW, scores, highres=highres, zoom_cells=k) / 1e9
        return measured[k]

    lo, hi = 0, cells
    if target_gflops <= cost(lo):
        return 0
    if target_gflops >= cost(hi):
        return cells
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= target_gflops else (lo, mid)
    return min((lo, hi), key=lambda k: abs(cost(k) - target_gflops))


@torch.no_grad()
def calibrate_operating_point(
    config: PipelineConfig, zoomer_weights: str | Path, *, splits: DecodedSplits | None = None
) -> dict[str, Any]:
    """alpha for ``zoomvit.target_tokens`` (or ``target_gflops``), the training range of alphas
    (from no zoom to twice the target's extra tokens), and what was measured, from the Zoomer's maps
    of the calibration slice."""
    import timm

    from zoomvit.models.loading import load_state_dict_file

    zv, data = config.zoomvit, config.data
    model = timm.create_model(
        zv.model,
        num_classes=data.num_classes,
        zoomer_width=config.zoomer.width,
        zoomer_depth=config.zoomer.depth,
        zoomer_head=config.zoomer.head,
        zoom_merge=zv.merge,
        detail_gate=zv.detail_gate,
        zoom_source=zv.zoom_source,
        **zv.model_kwargs,
    ).eval()
    model.zoomer.load_state_dict(load_state_dict_file(zoomer_weights))
    model.zoomer.freeze()
    highres = zv.reads_highres
    scores, keys = [], []
    for batch in sample_dataset(data, "train", part="calibration", highres=highres, splits=splits).iter_batches(
        batch_size=256, batch_format="numpy"
    ):
        x = numpy_batch_input(batch, data)
        x_hr = numpy_batch_input(batch, data, "image_hr") if highres else None
        scores.append(model.importance(x, x_hr))
        keys.extend(str(k) for k in batch["key"])
    if not keys:
        raise ValueError("the calibration slice is empty: raise data.calibration_fraction")
    scores_NHW = torch.cat(scores)
    cells, per_cell = model.num_cells, TOKENS_PER_ZOOMED_CELL[zv.merge]
    if zv.target_tokens is not None:
        target_cells = (zv.target_tokens - cells) / per_cell
        if not 0 <= target_cells <= cells:
            raise ValueError(
                f"target of {zv.target_tokens} tokens per image is outside "
                f"[{cells}, {cells + per_cell * cells}] for merge={zv.merge}"
            )
    else:
        target_cells = cells_for_gflops(model, zv.target_gflops, x[:1], None if x_hr is None else x_hr[:1])
    alpha = alpha_for_cells(scores_NHW, target_cells)
    train_alpha = sorted((alpha_for_cells(scores_NHW, min(cells, 2 * target_cells)), alpha_for_cells(scores_NHW, 0)))
    achieved_cells = float((scores_NHW > alpha).sum(dim=(1, 2)).float().mean())
    return {
        "alpha": alpha,
        "train_alpha": train_alpha,
        "target_cells": float(target_cells),
        "target_tokens": float(cells + per_cell * target_cells),
        "target_gflops": zv.target_gflops,
        "calibration_tokens_per_img": cells + per_cell * achieved_cells,
        "calibration_zoomed_cells_per_img": achieved_cells,
        "calibration_samples": len(keys),
        "calibration_keys_digest": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest(),
    }
