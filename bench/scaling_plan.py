"""The ImageNet-1k plan of docs/scaling.md, from measured inputs.

    python bench/scaling_plan.py [--mfu 0.35] [--decode-images 200]

Measured here: FLOPs of each model with torch's flop counter (the teacher's gradient-rollout pass
exactly as the relevance actor runs it, forward and backward); the JPEG decode + resize rate of
the project's decoder on real photographs re-encoded at ImageNet's typical size; the bytes per
row of a relevance Parquet file. Taken as given: ImageNet-1k sizes, GPU peak bf16 throughput,
the model FLOPs utilisation (--mfu), epochs from pipelines/configs/imagenet.yaml.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import timm
import torch
from _common import print_table, write_result
from PIL import Image

import zoomvit.models  # noqa: F401
from zoomvit.data.decode import ImageTransform, decode_sample
from zoomvit.models.flops import count_flops
from zoomvit.relevance.attribution import relevance_maps

TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000
TRAIN_SHARDS, VAL_SHARDS = 1024, 64
TRAIN_BYTES, VAL_BYTES = 146.9e9, 6.7e9  # the ILSVRC2012 JPEGs; the WDS shards add ~1 KB of tar/json per sample
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}


def decode_rate(n: int) -> tuple[float, float]:
    """Images/s of decode_sample (decode, RGB, resize 256 + centre crop 224) on one core, and mean JPEG bytes."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    jpegs = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        box = ((i * 7) % (w - 400), (i * 5) % (h - 300))
        crop = photo.crop((box[0], box[1], box[0] + 400, box[1] + 300)).resize((500, 375))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    transform = ImageTransform(image_size=224, resize_mode="center_crop", crop_pct=0.875)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i, data in enumerate(jpegs):
        decoded, _ = decode_sample(
            {"__key__": f"k{i}", "jpg": data, "cls": b"1"}, num_classes=1000, transform=transform
        )
        assert decoded is not None
    return n / (time.perf_counter() - start), float(np.mean([len(j) for j in jpegs]))


def parquet_bytes_per_row(grid: int, num_rows: int = 2048) -> float:
    import tempfile
    from pathlib import Path

    from zoomvit.data.relevance_store import write_group

    rng = np.random.default_rng(0)
    rows = [
        {
            "key": f"n01440764_{i:05d}",
            "shard": "s3://bucket/imagenet-1k-wds/imagenet1k-train-0000.tar",
            "index": i,
            "label": int(rng.integers(1000)),
            "target": int(rng.integers(1000)),
            "teacher_pred": int(rng.integers(1000)),
            "teacher_prob": float(rng.random()),
            "grid_h": grid,
            "grid_w": grid,
            "relevance": (rng.random(grid * grid) ** 4).astype(np.float32),
            "teacher_logits": rng.normal(0, 3, 1000).astype(np.float32),
        }
        for i in range(num_rows)
    ]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g.parquet"
        write_group(rows, path, {"teacher": "deit_base_patch16_224"})
        return path.stat().st_size / num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation on GPU")
    parser.add_argument("--decode-images", type=int, default=200)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)

    teacher = timm.create_model("deit_base_patch16_224", num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    teacher_fwd = count_flops(teacher, x)
    relevance_flops = count_flops(relevance_maps, teacher, x, labels_B=torch.tensor([1]))
    del teacher

    zoomvit = timm.create_model("zoomvit_small_patch16_224", num_classes=1000, zoomer_width=64, zoomer_depth=2).eval()
    zoomer_fwd = count_flops(zoomvit.zoomer, x)
    vit_fwd = {}
    for tokens in (196, 295, 391):
        model = timm.create_model(
            "zoomvit_small_patch16_224", num_classes=1000, token_budget=tokens, with_zoomer=False
        ).eval()
        scores = torch.rand(1, 14, 14)
        with torch.no_grad():
            vit_fwd[tokens] = count_flops(model, x, scores=scores)
    images = TRAIN_IMAGES + VAL_IMAGES

    decode_ips, jpeg_bytes = decode_rate(args.decode_images)
    row_bytes = parquet_bytes_per_row(14)

    def gpu_hours(total_flops: float, gpu: str) -> float:
        return total_flops / (args.mfu * PEAK_BF16[gpu]) / 3600

    rows = []
    relevance_total = relevance_flops * images
    rows.append(
        {
            "item": "relevance pass (grad rollout, train+val)",
            "flops": relevance_total,
            "A100_h": gpu_hours(relevance_total, "A100"),
            "H100_h": gpu_hours(relevance_total, "H100"),
        }
    )
    zoomer_total = 3 * zoomer_fwd * TRAIN_IMAGES * 30
    rows.append(
        {
            "item": "Zoomer, 30 epochs",
            "flops": zoomer_total,
            "A100_h": gpu_hours(zoomer_total, "A100"),
            "H100_h": gpu_hours(zoomer_total, "H100"),
        }
    )
    for tokens, fwd in vit_fwd.items():
        total = (3 * fwd + zoomer_fwd) * TRAIN_IMAGES * 400
        rows.append(
            {
                "item": f"ZoomViT-S {tokens} tokens, 400 epochs",
                "flops": total,
                "A100_h": gpu_hours(total, "A100"),
                "H100_h": gpu_hours(total, "H100"),
            }
        )
    print_table(rows)

    feed = {}
    for gpu in PEAK_BF16:
        relevance_ips = args.mfu * PEAK_BF16[gpu] / relevance_flops * args.gpus_per_node
        train_ips = args.mfu * PEAK_BF16[gpu] / (3 * vit_fwd[295] + zoomer_fwd) * args.gpus_per_node
        feed[gpu] = {
            "relevance_img_per_s_per_node": relevance_ips,
            "relevance_decode_cores_per_node": relevance_ips / decode_ips,
            "train_img_per_s_per_node": train_ips,
            "train_decode_cores_per_node": train_ips / decode_ips,
        }
    summary = {
        "teacher_forward_gflops": teacher_fwd / 1e9,
        "relevance_gflops_per_image": relevance_flops / 1e9,
        "zoomer_forward_gflops": zoomer_fwd / 1e9,
        "zoomvit_s_forward_gflops": {t: f / 1e9 for t, f in vit_fwd.items()},
        "decode_img_per_s_per_core": decode_ips,
        "synthetic_jpeg_bytes": jpeg_bytes,
        "parquet_bytes_per_row_14x14": row_bytes,
        "parquet_total_gb": row_bytes * images / 1e9,
        "train_shard_mb": TRAIN_BYTES / TRAIN_SHARDS / 1e6,
        "feed": feed,
        "mfu": args.mfu,
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"wrote {write_result('scaling_plan', {'args': vars(args), 'rows': rows, 'summary': summary})}")


if __name__ == "__main__":
    main()
