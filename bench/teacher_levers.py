"""Which lever makes the demo teacher learn: the teacher's architecture and batch size measured
outside the pipeline, in one plain PyTorch loop on the decoded demo images (no Ray, no DeepSpeed),
so that only the lever differs between rows.

    python bench/teacher_levers.py [--data demo_data/demo] [--epochs 6] [--variants plain stem conv_stem]
                                   [--batch-sizes 64 32] [--train-limit N] [--student-epochs 3] [--name NAME]

Choose levers on a development set, not on the split you report: e.g. ``--data
demo_data/dev-default-s1`` (the generator with ``seed: 1``), then report the choice on the demo's val.

Variants (all the demo ViT: 64 px, 8 px patches, dim 96, depth 4, heads 3, AdamW lr 1e-3, wd 0.05,
one warmup epoch then cosine, random resized crops [0.5, 1]):
- plain: timm's linear patch embedding (what the demo teacher is);
- stem: a non-overlapping conv stem (three 2x2 stride-2 convs with GELU): each 8 px patch is still
  embedded on its own, so ZoomViT's per-cell tokenizer could use it;
- conv_stem: an overlapping conv stem (three 3x3 stride-2 convs with BatchNorm and ReLU, Xiao et al.
  2021, "Early convolutions help transformers see better"): tokens see their neighbours' pixels.
- cell_stem: the same convolutions on each 8 px patch alone (zero padding at the patch border): the
  non-linearity and kernels of conv_stem without the overlap.
``--student-epochs N`` then fine-tunes a plain ViT (the students' architecture) from each teacher for N
epochs at lr 5e-4, loading every weight whose name and shape match (a stem teacher's patch embedding
does not: the student's starts random), as the pipeline's ``init_from_teacher`` does.
Writes bench/results/<name>.json (val top-1 after every epoch).
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import print_table, write_result
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in sorted(root.glob(f"{split}-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for sample in members.values():
            images.append(np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            labels.append(int(sample["cls"]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5, torch.tensor(labels)


class CellStem(nn.Module):
    """``conv_stem``'s convolutions applied to each 8 px patch on its own (zero padding at the patch
    border): one token per patch, seeing only its own pixels, as ZoomViT's per-cell tokenizer needs."""

    def __init__(self, stem: nn.Module, patch: int = 8) -> None:
        super().__init__()
        self.stem, self.patch = stem, patch

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_BCHW.shape
        p, gh, gw = self.patch, h // self.patch, w // self.patch
        cells = x_BCHW.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b * gh * gw, c, p, p)
        return self.stem(cells).reshape(b, gh, gw, -1).permute(0, 3, 1, 2)


def build(variant: str) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    if variant == "stem":
        model.patch_embed.proj = nn.Sequential(
            nn.Conv2d(3, 24, 2, 2), nn.GELU(), nn.Conv2d(24, 48, 2, 2), nn.GELU(), nn.Conv2d(48, 96, 2, 2)
        )
    elif variant == "conv_stem":
        model.patch_embed.proj = nn.Sequential(
            nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 48, 3, 2, 1), nn.BatchNorm2d(48), nn.ReLU(),
            nn.Conv2d(48, 96, 3, 2, 1),
        )  # fmt: skip
    elif variant == "cell_stem":
        model.patch_embed.proj = CellStem(
            nn.Sequential(
                nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU(),
                nn.Conv2d(24, 48, 3, 2, 1), nn.BatchNorm2d(48), nn.ReLU(),
                nn.Conv2d(48, 96, 3, 2, 1),
            )
        )  # fmt: skip
    elif variant != "plain":
        raise ValueError(f"unknown variant {variant!r}")
    return model


def random_resized_crops(x_BCHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    out = torch.empty_like(x_BCHW)
    size = x_BCHW.shape[-1]
    for i in range(len(x_BCHW)):
        side = int(size * math.sqrt(torch.empty(1).uniform_(0.5, 1.0, generator=generator).item()))
        x0, y0 = torch.randint(0, size - side + 1, (2,), generator=generator).tolist()
        crop = x_BCHW[i : i + 1, :, y0 : y0 + side, x0 : x0 + side]
        out[i] = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0]
    return out


def fit(model: nn.Module, name: str, batch_size: int, epochs: int, data, *, lr: float, warmup_epochs: float) -> dict:
    (x_train, y_train), (x_val, y_val) = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = len(x_train) // batch_size
    total, warmup = epochs * steps_per_epoch, max(1, int(warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(0)
    curve, start = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(random_resized_crops(x_train[idx], generator)), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            curve.append(float((model(x_val).argmax(1) == y_val).float().mean()))
        print(f"{name} batch {batch_size}: epoch {len(curve)} val top-1 {curve[-1]:.3f}", flush=True)
    return {"batch_size": batch_size, "val_top1": curve[-1], "curve": curve, "seconds": time.perf_counter() - start}


def student_from(teacher: nn.Module) -> nn.Module:
    student = build("plain")
    own = student.state_dict()
    matching = {k: v for k, v in teacher.state_dict().items() if k in own and v.shape == own[k].shape}
    student.load_state_dict(matching, strict=False)
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "demo_data" / "demo"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--variants", nargs="+", default=["plain", "stem", "conv_stem"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    parser.add_argument("--student-epochs", type=int, default=0)
    parser.add_argument("--name", default="teacher_levers", help="result file name")
    args = parser.parse_args()
    torch.set_num_threads(2)
    x_train, y_train = load_split(Path(args.data), "train")
    data = (x_train[: args.train_limit], y_train[: args.train_limit]), load_split(Path(args.data), "val")
    rows = []
    for b in args.batch_sizes:
        for variant in args.variants:
            torch.manual_seed(0)
            teacher = build(variant)
            row = {"variant": variant, **fit(teacher, variant, b, args.epochs, data, lr=1e-3, warmup_epochs=1)}
            if args.student_epochs:
                torch.manual_seed(0)
                student = fit(student_from(teacher), f"{variant} -> plain student", 64, args.student_epochs, data,
                              lr=5e-4, warmup_epochs=0.5)  # fmt: skip
                row |= {"student_top1": student["val_top1"], "student_curve": student["curve"]}
            rows.append(row)
    print_table([{k: v for k, v in r.items() if "curve" not in k} for r in rows])
    print(f"wrote {write_result(args.name, {'args': vars(args), 'train_images': len(data[0][0]), 'rows': rows})}")


if __name__ == "__main__":
    main()
