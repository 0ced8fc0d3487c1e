"""Uncertainty for the evaluate stage: bootstrap intervals, and ZoomViT against the baseline family
interpolated at its GFLOPs, paired over the same images."""

from __future__ import annotations

from typing import Any

import numpy as np


def bootstrap_ci(hits: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image outcomes (0/1 hits, or paired differences)."""
    hits = np.asarray(hits, dtype=np.float64)
    if len(hits) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), size=(resamples, len(hits)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


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
