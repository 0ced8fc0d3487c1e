"""The detail gate's statistic on a split's training shards: per patch cell, the RMS of what the 2x
copy holds beyond its own 2x2 average (``zoomvit.models.tokenizer.detail_energy``), for cells inside
fine-stratum objects, inside coarse-stratum objects, and outside every object.

    python bench/detail_gate.py demo_data/fine-dev [--shards 3] [--grid 8]

Where ``zoomvit.detail_gate`` should sit is read here, on the development split's train shards: a
threshold between the fine objects' low percentiles and the coarse objects' high ones zooms the
first and not the second. Writes bench/results/detail_gate_<name of the folder>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from _common import write_result
from PIL import Image
from tradeoff import git_state

from zoomvit.models.tokenizer import detail_energy

PERCENTILES = (5, 25, 50, 75, 95)


def read_shard(path: Path):
    """(image uint8 HWC, meta) for every sample of a WebDataset tar."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                key, ext = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for parts in samples.values():
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        if image is None or "json" not in parts:
            continue
        yield np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), json.loads(parts["json"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--grid", type=int, default=8, help="the model's patch grid (8: a 64 px model, 8 px patches)")
    args = parser.parse_args()

    cells: dict[str, list[float]] = {"inside_fine": [], "inside_coarse": [], "outside": []}
    for shard in sorted(args.root.glob("train-*.tar"))[: args.shards]:
        for image, meta in read_shard(shard):
            x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # the model's (x-.5)/.5
            energy = detail_energy(x, (args.grid, args.grid))[0].numpy()
            side = image.shape[0] / args.grid
            x0, y0, x1, y1 = meta["box"]
            for r in range(args.grid):
                for c in range(args.grid):
                    cover_x = max(0.0, min((c + 1) * side, x1) - max(c * side, x0)) / side
                    cover_y = max(0.0, min((r + 1) * side, y1) - max(r * side, y0)) / side
                    cover = cover_x * cover_y
                    if cover >= 0.99:
                        cells[f"inside_{meta.get('stratum', 'fine')}"].append(float(energy[r, c]))
                    elif cover == 0:
                        cells["outside"].append(float(energy[r, c]))
    summary = {
        name: {"cells": len(v), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}}
        for name, v in cells.items()
        if v
    }
    for name, row in summary.items():
        print(f"{name:14s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "git": git_state(),
        "args": {**vars(args), "root": str(args.root)},
        "detail_energy": summary,
    }
    print(f"wrote {write_result(f'detail_gate_{args.root.name}', payload)}")


if __name__ == "__main__":
    main()
