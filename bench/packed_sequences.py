"""Packed vs padded variable-length batches: ZoomViT's training step with per-image alphas.

Training draws each image's alpha from ``train_alpha``, so a batch holds images from the grid's
token count up to four times it. ``padded`` runs every image at the batch's longest length with a
float attention mask; ``packed`` runs the images' real tokens as one sequence with attention
restricted to each image (``zoomvit.models.packed``). Reports, side by side in one run: the tokens
computed per batch (padded: B x the longest; packed: the sum of the lengths) and the share of them
that is padding, and the median time of a forward+backward step.

    python bench/packed_sequences.py [--model demo] [--batch 64] [--alpha 0.1 1.0] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from _common import median_time, print_table, write_result

import zoomvit.models  # noqa: F401

MODELS = {"demo": ("zoomvit_demo_patch8_64", 64), "small": ("zoomvit_small_patch16_224", 224)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--alpha", type=float, nargs=2, default=(0.1, 1.0), help="the recipe's train_alpha")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    name, size = MODELS[args.model]
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    models = {}
    for mode in ("padded", "packed"):
        torch.manual_seed(0)
        models[mode] = timm.create_model(name, with_zoomer=False, sequences=mode).to(device).train()
    grid = models["packed"].grid
    scores = torch.rand(args.batch, *grid, generator=g).to(device)
    alpha = torch.empty(args.batch).uniform_(*args.alpha, generator=g).to(device)
    target = torch.randint(0, models["packed"].num_classes, (args.batch,), generator=g).to(device)
    tokens_B = models["packed"].tokenize(images, scores, alpha=alpha).num_tokens_B
    real, longest = int(tokens_B.sum()), int(tokens_B.max())

    def step(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images, scores, alpha=alpha), target).backward()

    sync = device.type == "cuda"
    rows = []
    for mode, model in models.items():
        computed = args.batch * longest if mode == "padded" else real
        rows.append(
            {
                "sequences": mode,
                "tokens_computed": computed,
                "padding_share": 1 - real / computed,
                "step_ms": 1e3 * median_time(lambda m=model: step(m), repeats=args.repeats, sync=sync),
            }
        )
    rows[1]["speedup_vs_padded"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    rows[0]["speedup_vs_padded"] = 1.0
    print(f"{name}, batch {args.batch}, alpha ~ U{tuple(args.alpha)}: {real} real tokens, longest {longest}")
    print_table(rows)
    print(f"wrote {write_result('packed_sequences', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
