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
from zoomvit.train.data import DecodedSplits, numpy_batch_input, sample_dataset


def calibrate_alpha(scores_NHW: torch.Tensor, target_tokens: float) -> float:
    """The alpha whose layouts of these maps average ``target_tokens`` tokens per image (each
    zoomed cell adds 3): the midpoint between the k-th and (k+1)-th highest score of the slice."""
    N, gh, gw = scores_NHW.shape
    cells = gh * gw
    if not cells <= target_tokens <= 4 * cells:
        raise ValueError(
            f"target of {target_tokens} tokens per image is outside [{cells}, {4 * cells}] for a {gh}x{gw} grid"
        )
    flat = scores_NHW.detach().double().flatten().sort(descending=True).values
    k = int(round((target_tokens - cells) / 3 * N))
    if k == 0:
        return float(min(1.0, flat[0] + 1e-6))
    if k >= len(flat):
        return float(max(0.0, flat[-1] - 1e-6))
    return float((flat[k - 1] + flat[k]) / 2)


def tokens_for_gflops(model, target_gflops: float, image_BCHW: torch.Tensor) -> float:
    """The token count whose measured cost (backbone + Zoomer, one image) is closest to the target;
    cost rises with the count, so a bisection over the reachable counts (cells + 3k) finds it."""
    from zoomvit.models.flops import count_flops

    cells = model.num_cells
    zoomer = count_flops(model.zoomer, image_BCHW) / 1e9
    scores = torch.rand(1, *model.grid)

    measured: dict[int, float] = {}

    def cost(k: int) -> float:
        if k not in measured:
            measured[k] = zoomer + count_flops(model, image_BCHW, scores, token_budget=cells + 3 * k) / 1e9
        return measured[k]

    lo, hi = 0, cells
    if target_gflops <= cost(lo):
        return float(cells)
    if target_gflops >= cost(hi):
        return float(4 * cells)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= target_gflops else (lo, mid)
    best = min((lo, hi), key=lambda k: abs(cost(k) - target_gflops))
    return float(cells + 3 * best)


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
        **zv.model_kwargs,
    ).eval()
    model.zoomer.load_state_dict(load_state_dict_file(zoomer_weights))
    model.zoomer.freeze()
    scores, keys = [], []
    for batch in sample_dataset(data, "train", part="calibration", splits=splits).iter_batches(
        batch_size=256, batch_format="numpy"
    ):
        x = numpy_batch_input(batch, data)
        scores.append(model.importance(x))
        keys.extend(str(k) for k in batch["key"])
    if not keys:
        raise ValueError("the calibration slice is empty: raise data.calibration_fraction")
    scores_NHW = torch.cat(scores)
    target = zv.target_tokens
    if target is None:
        target = tokens_for_gflops(model, zv.target_gflops, x[:1])
    cells = model.num_cells
    alpha = calibrate_alpha(scores_NHW, target)
    widest = min(4 * cells, 2 * target - cells)
    train_alpha = sorted((calibrate_alpha(scores_NHW, widest), calibrate_alpha(scores_NHW, cells)))
    achieved = cells + 3 * float((scores_NHW > alpha).sum(dim=(1, 2)).float().mean())
    return {
        "alpha": alpha,
        "train_alpha": train_alpha,
        "target_tokens": float(target),
        "target_gflops": zv.target_gflops,
        "calibration_tokens_per_img": achieved,
        "calibration_samples": len(keys),
        "calibration_keys_digest": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest(),
    }
