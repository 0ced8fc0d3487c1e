"""Measure a demo preset's construction before training anything on it: how much of the class
survives the decode at each input size.

Two measurements per input size, over samples re-rendered from the generator's own arguments (the
same bytes as the shards) and decoded through the data path's :class:`ImageTransform`:

- **detail survival**: the share of the class's own layer (the image minus the same image without
  its texture) whose energy survives the resize to that size and back, inside the object's box;
- **crop accuracy**: a small CNN trained on crops around the object decoded at that size, tested
  on held-out samples (the generator's val split), per stratum.

For the ``fine``, ``shapes`` and ``shapes2`` presets the construction is right when the half-size
(64 px) crop accuracy on the fine stratum is near chance (10%) and the full-size (128 px) one is high.
The 64 px decode of a 128 px JPEG is libjpeg's half-size DCT decode (PIL's ``draft``), as in training.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from zoomvit.data.decode import ImageTransform
from zoomvit.data.demo import LAYERED_STYLES, DemoSpec, render_layers
from zoomvit.data.fine import encode_jpeg

CROP_FRACTION = 0.42  # of the image side: the largest fine object (0.375) with a margin
FAMILY_SIZES: tuple[int, ...] = (64, 72, 80, 88, 96, 112, 128)  # the 64 px model, the family, the stored size


@dataclass(frozen=True, kw_only=True)
class ProbeSample:
    label: int
    stratum: str
    box: tuple[int, int, int, int]
    jpeg: bytes
    glyph_layer: np.ndarray


def probe_samples(spec: DemoSpec, split: str, count: int) -> list[ProbeSample]:
    """The first ``count`` samples of ``split``: the shards' JPEG bytes (the same encode of the same
    render) with the class's own layer."""
    if spec.style not in LAYERED_STYLES:
        raise ValueError(f"the probe measures the styles {LAYERED_STYLES}; this spec has style {spec.style!r}")
    out = []
    for i in range(count):
        r = render_layers(spec, split, i)
        out.append(ProbeSample(label=r.label, stratum=r.stratum, box=r.box, jpeg=encode_jpeg(r.pixels),
                               glyph_layer=r.glyph_layer))  # fmt: skip
    return out


def _resize_float(layer_HWC: np.ndarray, size: int) -> np.ndarray:
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(layer_HWC[..., c])).resize((size, size), Image.Resampling.BICUBIC)
        )
        for c in range(layer_HWC.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def detail_survival(samples: list[ProbeSample], size: int) -> dict[str, float]:
    """Per stratum: the energy of the class's layer after a resize to ``size`` and back, over its
    energy at the stored size (1.0: nothing lost), inside each object's box."""
    kept: dict[str, list[float]] = {}
    for s in samples:
        stored = s.glyph_layer.shape[0]
        back = _resize_float(_resize_float(s.glyph_layer, size), stored) if size != stored else s.glyph_layer
        x0, y0, x1, y1 = s.box
        original = s.glyph_layer[y0:y1, x0:x1]
        energy = float((original**2).sum())
        if energy > 0:
            kept.setdefault(s.stratum, []).append(float((back[y0:y1, x0:x1] ** 2).sum()) / energy)
    return {stratum: float(np.mean(v)) for stratum, v in sorted(kept.items())}


def object_crops(samples: list[ProbeSample], size: int) -> np.ndarray:
    """Each sample decoded at ``size`` (the data path's transform), cropped to a fixed window centred
        on its object (at an even offset, so a texture at the pixel grid keeps its phase; an object larger than the
    window is cropped whole and shrunk to it): uint8 (N, w, w, 3)."""
    transform = ImageTransform(image_size=size)
    out = []
    for s in samples:
        with Image.open(io.BytesIO(s.jpeg)) as img:
            stored = img.size[0]
            pixels = transform.apply(img)
        window = round(CROP_FRACTION * size)
        scale = size / stored
        side = max(window, round((s.box[2] - s.box[0]) * scale))
        cx, cy = (s.box[0] + s.box[2]) / 2 * scale, (s.box[1] + s.box[3]) / 2 * scale
        x = int(np.clip(round(cx - side / 2), 0, size - side)) // 2 * 2
        y = int(np.clip(round(cy - side / 2), 0, size - side)) // 2 * 2
        crop = pixels[y : y + side, x : x + side]
        if side != window:  # a large (coarse) object, shrunk to the window: its strokes survive that
            crop = np.asarray(Image.fromarray(crop).resize((window, window), Image.Resampling.BICUBIC))
        out.append(crop)
    return np.stack(out)


class CropNet(nn.Module):
    """A small CNN over a crop of any size (global pooling)."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(3, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), nn.MaxPool2d(2), *conv(2 * width, 2 * width),
        )  # fmt: skip
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_BCHW).mean(dim=(2, 3)))


def _as_input(crops_NHWC: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(crops_NHWC).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def crop_accuracy(
    train: list[ProbeSample],
    val: list[ProbeSample],
    size: int,
    *,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Val accuracy per stratum (and ``all``) of a :class:`CropNet` trained on ``train``'s crops at ``size``."""
    torch.manual_seed(seed)
    x_train, y_train = _as_input(object_crops(train, size)), torch.tensor([s.label for s in train])
    x_val, y_val = _as_input(object_crops(val, size)), torch.tensor([s.label for s in val])
    model = CropNet(width=width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(1) for x in x_val.split(256)]) == y_val
    strata = np.asarray([s.stratum for s in val])
    out = {"all": float(hits.float().mean())}
    for stratum in sorted(set(strata)):
        out[stratum] = float(hits[torch.from_numpy(strata == stratum)].float().mean())
    return out


def probe_preset(
    spec: DemoSpec,
    sizes: tuple[int, ...] = FAMILY_SIZES,
    *,
    train: int = 2048,
    val: int = 512,
    epochs: int = 12,
    seed: int = 0,
) -> dict[str, Any]:
    """Detail survival and crop accuracy at each of ``sizes`` on ``train``/``val`` samples of ``spec``."""
    spec = replace(spec, train=max(spec.train, train), val=max(spec.val, val))
    started = time.perf_counter()
    train_samples, val_samples = probe_samples(spec, "train", train), probe_samples(spec, "val", val)
    rows = []
    for size in sizes:
        t0 = time.perf_counter()
        rows.append(
            {
                "size": size,
                "detail_survival": detail_survival(val_samples, size),
                "crop_top1": crop_accuracy(train_samples, val_samples, size, epochs=epochs, seed=seed),
                "seconds": time.perf_counter() - t0,
            }
        )
    return {
        "style": spec.style,
        "stored_size": spec.image_size,
        "seed": spec.seed,
        "train": train,
        "val": val,
        "epochs": epochs,
        "chance": 0.1,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
