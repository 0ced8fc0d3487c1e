"""ZoomViT forward time vs timm's ViT at the same token count (the zoom tokenizer's overhead).

Rows:
- uniform: ZoomViT with alpha above every score (exactly the baseline's N tokens) vs the baseline.
- budget K: ZoomViT in token-budget mode (K tokens, mixed zoom levels) vs the baseline's own
  transformer run on K tokens (same blocks, same length, uniform tokenizer cost excluded).

    python bench/zoomvit_forward.py [--model small] [--batch 8] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import timm
import torch
from _common import median_time, print_table, write_result

import zoomvit.models  # noqa: F401

SIZES = {
    "small": ("zoomvit_small_patch16_224", "deit_small_patch16_224", 224),
    "demo": ("zoomvit_demo_patch8_64", "vit_demo_patch8_64", 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    zoom_name, base_name, size = SIZES[args.model]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    zoomvit = timm.create_model(zoom_name, with_zoomer=False).to(device, dtype).eval()
    baseline = timm.create_model(base_name, img_size=size, num_classes=zoomvit.num_classes).to(device, dtype).eval()
    images = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
    scores = torch.rand(args.batch, *zoomvit.grid, device=device)
    n = zoomvit.num_cells
    sync = device.type == "cuda"

    def baseline_on(length: int):
        tokens = torch.randn(args.batch, length + 1, baseline.embed_dim, device=device, dtype=dtype)
        return lambda: baseline.forward_head(baseline.norm(baseline.blocks(tokens)))

    rows = []
    with torch.inference_mode():
        t_zoom = median_time(lambda: zoomvit(images, scores, alpha=2.0), repeats=args.repeats, sync=sync)
        t_base = median_time(lambda: baseline(images), repeats=args.repeats, sync=sync)
        rows.append(
            {
                "mode": "uniform",
                "tokens": n,
                "zoomvit_ms": 1e3 * t_zoom,
                "baseline_ms": 1e3 * t_base,
                "ratio": t_zoom / t_base,
            }
        )
        for k in (n // 4, n // 2):
            budget = n + 3 * k
            t_zoom = median_time(
                lambda budget=budget: zoomvit(images, scores, token_budget=budget), repeats=args.repeats, sync=sync
            )
            t_base = median_time(baseline_on(budget), repeats=args.repeats, sync=sync)
            rows.append(
                {
                    "mode": f"budget {budget}",
                    "tokens": budget,
                    "zoomvit_ms": 1e3 * t_zoom,
                    "baseline_ms": 1e3 * t_base,
                    "ratio": t_zoom / t_base,
                }
            )
    print_table(rows)
    path = write_result(f"zoomvit_forward_{args.model}_{device.type}", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
