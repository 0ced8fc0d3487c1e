"""FLOPs per image, measured with ``torch.utils.flop_counter`` (one multiply-add = 2 FLOPs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True, kw_only=True)
class FlopReport:
    """Per-image cost of a batch: backbone (tokenizer + transformer + head) and Zoomer GFLOPs."""

    gflops_B: torch.Tensor
    zoomer_gflops: float
    tokens_B: torch.Tensor

    @property
    def gflops(self) -> float:
        return float(self.gflops_B.mean()) + self.zoomer_gflops

    @property
    def tokens(self) -> float:
        return float(self.tokens_B.float().mean())


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


# The detail gate per value of the 2x copy: the 2x2 average (1 add), the residual (1), its square (1)
# and the per-cell sums (1); the flop counter sees none of these elementwise operations.
DETAIL_GATE_FLOPS_PER_VALUE = 4


def selector_gflops(model: nn.Module, images_BCHW: torch.Tensor, highres: torch.Tensor | None = None) -> float:
    """GFLOPs per image of choosing the cells: the Zoomer (counted) and, with ``detail_gate``, the
    gate over the 2x copy (its elementwise operations, by formula)."""
    gflops = count_flops(model.zoomer, images_BCHW[:1]) / 1e9
    if getattr(model, "detail_gate", None) is not None:
        assert highres is not None
        gflops += DETAIL_GATE_FLOPS_PER_VALUE * highres[:1].numel() / 1e9
    return gflops


@torch.no_grad()
def zoomvit_flops(
    model: nn.Module,
    images_BCHW: torch.Tensor,
    scores_BHW: torch.Tensor | None = None,
    *,
    highres: torch.Tensor | None = None,
    **zoom: Any,
) -> FlopReport:
    """Measured GFLOPs of every image run alone (no padding), for a ZoomViT or any timm model.

    A ZoomViT image's cost depends only on its token count, so each distinct count is measured
    once. The Zoomer's cost is counted when it supplies the scores. ``highres``: the 2x copy a
    ``zoom_source='highres'`` model reads (its zoomed tokens cost what up-sampled ones do).
    """
    from zoomvit.models.zoomvit import ZoomViT

    was_training = model.training
    model.eval()
    try:
        if not isinstance(model, ZoomViT):
            gflops = count_flops(model, images_BCHW[:1]) / 1e9
            tokens = uniform_tokens(model)
            B = images_BCHW.shape[0]
            return FlopReport(gflops_B=torch.full((B,), gflops), zoomer_gflops=0.0, tokens_B=torch.full((B,), tokens))
        zoomer_gflops = 0.0
        if scores_BHW is None:
            scores_BHW = model.importance(images_BCHW)
            zoomer_gflops = count_flops(model.zoomer, images_BCHW[:1]) / 1e9
        tokens_B = model.layout(scores_BHW, model.zoom_config(**zoom)).num_tokens_B.cpu()
        per_count: dict[int, float] = {}
        for i, n in enumerate(tokens_B.tolist()):
            if n not in per_count:
                hr = None if highres is None else highres[i : i + 1]
                per_count[n] = (
                    count_flops(model, images_BCHW[i : i + 1], scores_BHW[i : i + 1], highres=hr, **zoom) / 1e9
                )
        gflops_B = torch.tensor([per_count[n] for n in tokens_B.tolist()])
        return FlopReport(gflops_B=gflops_B, zoomer_gflops=zoomer_gflops, tokens_B=tokens_B)
    finally:
        model.train(was_training)


class TokenCostTable:
    """A ZoomViT image's GFLOPs by its token count and zoomed cells (its cost depends on nothing
    else: the transformer on the count, a folded cell's sub-cell embeddings on the cells), measured
    once per pair as pairs are seen: a whole val set costs one forward per distinct pair."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gflops: dict[tuple[int, int], float] = {}

    @torch.no_grad()
    def observe(
        self,
        images_BCHW: torch.Tensor,
        scores_BHW: torch.Tensor,
        tokens_B: torch.Tensor,
        zoomed_B: torch.Tensor,
        *,
        highres: torch.Tensor | None = None,
        **zoom: Any,
    ) -> None:
        """Measure every (tokens, zoomed cells) pair not measured yet, on the image that has it, run alone."""
        was_training = self.model.training
        self.model.eval()
        try:
            for i, key in enumerate(zip(tokens_B.tolist(), zoomed_B.tolist())):
                if key not in self.gflops:
                    one = {k: v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in zoom.items()}
                    hr = None if highres is None else highres[i : i + 1]
                    cost = count_flops(self.model, images_BCHW[i : i + 1], scores_BHW[i : i + 1], highres=hr, **one)
                    self.gflops[key] = cost / 1e9
        finally:
            self.model.train(was_training)

    def per_image(self, counts_N: np.ndarray, zoomed_N: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Each image's GFLOPs: run alone (``batch_size`` None; packed sequences spend the same), or in
        batches of ``batch_size`` in the given order, each padded to its longest sequence (what a
        padded forward spends: every image of a batch costs its longest image, except where nothing
        is padded, as in a fold or fixed-count batch, where each keeps its own)."""
        counts_N, zoomed_N = np.asarray(counts_N, dtype=np.int64), np.asarray(zoomed_N, dtype=np.int64)
        own = np.array([self.gflops[(int(n), int(z))] for n, z in zip(counts_N, zoomed_N)], dtype=np.float64)
        if batch_size is None:
            return own
        out = own.copy()
        for i in range(0, len(counts_N), batch_size):
            n = counts_N[i : i + batch_size]
            if not (n == n[0]).all():
                out[i : i + batch_size] = own[i + int(np.argmax(n))]
        return out

    def unpadded(self, counts_N: np.ndarray, zoomed_N: np.ndarray) -> float:
        """Mean GFLOPs/img with every image run alone (its own tokens)."""
        return float(self.per_image(counts_N, zoomed_N).mean())

    def padded(self, counts_N: np.ndarray, zoomed_N: np.ndarray, batch_size: int) -> float:
        """Mean GFLOPs/img in batches of ``batch_size``, each padded to its longest sequence."""
        return float(self.per_image(counts_N, zoomed_N, batch_size).mean())


def uniform_tokens(model: nn.Module) -> int:
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    return int(grid[0] * grid[1]) if grid is not None else 0
