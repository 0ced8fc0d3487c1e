"""Demo dataset: small handwritten digits in cluttered scenes, written as ImageNet-layout WebDataset shards.

Every sample is one ``image_size`` x ``image_size`` RGB JPEG holding one real UCI handwritten digit
(scikit-learn's bundled ``load_digits``) upscaled to a small random size at a random position, among
dimmer fragments of other digits, gaussian noise, a per-image background tint and, optionally,
crops of scikit-learn's bundled sample photos. The label is the digit's class; the ``.json`` member
records the digit's box so evaluation can report accuracy by object size.

``style="fine"`` (preset ``fine``, :mod:`zoomvit.data.fine`) renders another benchmark: the class lives
only in detail above a half-size view's Nyquist frequency, inside a small framed panel.
``style="shapes"`` (:mod:`zoomvit.data.shapes`) and ``style="shapes2"`` (:mod:`zoomvit.data.shapes2`, a
second generator of the same construction) make the class a small shape at any pixel offset whose
detail lies above that frequency. These three presets store their images at twice a 64 px model's
input unless told otherwise (:data:`STYLE_IMAGE_SIZES`).

``difficulty`` (0 to 1; presets ``default`` = 0, ``hard`` = 1) turns one knob: the digit shrinks
(sizes x (1 - 0.4 d)), clutter grows to the digit's size, gets saturated colours and up to the
digit's brightness, there is more of it and more noise, and with probability d the background is a
dimmed photograph. At 0 the output is exactly the original look (byte for byte).

Train and validation draw their digits (and clutter) from disjoint halves of the UCI images.
Output is byte-for-byte reproducible for the same arguments: each sample has its own random
stream derived from ``(seed, split, index)`` and tar headers carry fixed names, times and owners.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zoomvit import __version__
from zoomvit.durable import write_durably
from zoomvit.errors import UserError

DATASET_NAME = "zoomvit-demo-digits"
CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
FINE_CLASS_NAMES: tuple[str, ...] = tuple(f"texture_{d}" for d in range(10))
SPLITS: tuple[str, ...] = ("train", "val")
JPEG_QUALITY = 90
TAR_MTIME = 1_700_000_000

_SPLIT_IDS = {"train": 0, "val": 1}
_SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
_DIGIT_COLOR = (0.8, 1.0)
_CLUTTER_INTENSITY = (0.3, 0.55)
_CLUTTER_COLOR = (0.55, 1.0)
_BACKGROUND_TINT = (0.0, 0.18)
_FRAGMENT_CELLS = (2.0, 5.0)
_FRAGMENT_MAX_AREA = 16.0
_PHOTO_INTENSITY = (0.25, 0.5)
_STROKE_FLOOR = 0.15
_STROKE_GAMMA = 0.75
STYLES: tuple[str, ...] = ("digits", "fine", "shapes", "shapes2")
LAYERED_STYLES: tuple[str, ...] = ("fine", "shapes", "shapes2")  # rendered with the class's own layer
# preset -> (style, difficulty)
PRESETS: dict[str, tuple[str, float]] = {
    "default": ("digits", 0.0),
    "hard": ("digits", 1.0),
    "fine": ("fine", 0.0),
    "shapes": ("shapes", 0.0),
    "shapes2": ("shapes2", 0.0),
}
# style -> its stored image size where it is not DEFAULT_IMAGE_SIZE: twice a 64 px model's input
STYLE_IMAGE_SIZES: dict[str, int] = {"fine": 128, "shapes": 128, "shapes2": 128}
DEFAULT_IMAGE_SIZE = 64


def preset_image_size(preset: str) -> int:
    """The image size a preset stores unless told otherwise."""
    return STYLE_IMAGE_SIZES.get(PRESETS[preset][0], DEFAULT_IMAGE_SIZE)


def class_names(style: str) -> tuple[str, ...]:
    """The class names ``classes.txt`` lists for a style."""
    if style == "fine":
        return FINE_CLASS_NAMES
    if style == "shapes":
        from zoomvit.data.shapes import CLASS_NAMES as names

        return names
    if style == "shapes2":
        from zoomvit.data.shapes2 import CLASS_NAMES as names

        return names
    return CLASS_NAMES


@dataclass(frozen=True, kw_only=True)
class DemoSpec:
    """Arguments of :func:`generate_demo_dataset`, validated."""

    train: int
    val: int
    image_size: int | None = None  # None: the style's own (STYLE_IMAGE_SIZES, else 64)
    seed: int = 0
    samples_per_shard: int = 256
    digit_scale: tuple[float, float] = (0.18, 0.45)
    num_clutter: int = 6
    noise_std: float = 0.08
    photo_clutter: bool = False
    difficulty: float = 0.0
    style: str = "digits"

    def __post_init__(self) -> None:
        if self.image_size is None:
            object.__setattr__(self, "image_size", STYLE_IMAGE_SIZES.get(self.style, DEFAULT_IMAGE_SIZE))
        for name in ("train", "val", "image_size", "seed", "samples_per_shard", "num_clutter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UserError(f"{name} must be an int, got {value!r}")
        if self.train < 0 or self.val < 0:
            raise UserError(f"train and val must be >= 0, got train={self.train}, val={self.val}")
        if self.train + self.val == 0:
            raise UserError("train + val must be at least 1")
        if self.image_size < 16:
            raise UserError(f"image_size must be >= 16, got {self.image_size}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.samples_per_shard < 1:
            raise UserError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.num_clutter < 0:
            raise UserError(f"num_clutter must be >= 0, got {self.num_clutter}")
        if len(self.digit_scale) != 2:
            raise UserError(f"digit_scale must be (low, high), got {self.digit_scale!r}")
        low, high = (float(v) for v in self.digit_scale)
        if not 0.0 < low <= high <= 1.0:
            raise UserError(f"digit_scale must satisfy 0 < low <= high <= 1, got {self.digit_scale!r}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0.0):
            raise UserError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")
        if not (math.isfinite(self.difficulty) and 0.0 <= self.difficulty <= 1.0):
            raise UserError(f"difficulty must be in [0, 1], got {self.difficulty!r}")
        if self.style not in STYLES:
            raise UserError(f"style must be one of {STYLES}, got {self.style!r}")
        object.__setattr__(self, "digit_scale", (low, high))
        object.__setattr__(self, "difficulty", float(self.difficulty))
        object.__setattr__(self, "noise_std", float(self.noise_std))
        object.__setattr__(self, "photo_clutter", bool(self.photo_clutter))

    def count(self, split: str) -> int:
        return self.train if split == "train" else self.val


@dataclass(frozen=True, kw_only=True)
class RenderedSample:
    key: str
    jpeg: bytes
    label: int
    box: tuple[int, int, int, int]
    scale: float
    source_index: int | None  # the UCI digit drawn (None for the layered styles)
    stratum: str | None = None


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images.astype(np.float32) / 16.0, 0.0, 1.0)
    return images, bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(img, dtype=np.float32) / 255.0 for img in load_sample_images().images)


def split_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` used by a split: train the first half, val the second."""
    if split not in _SPLIT_IDS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    n = len(_digits()[1])
    half = (n + 1) // 2
    return np.arange(0, half) if split == "train" else np.arange(half, n)


def _upscale(cells: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(cells, dtype=np.float32))
    out = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip((out - _STROKE_FLOOR) / (1.0 - _STROKE_FLOOR), 0.0, 1.0) ** _STROKE_GAMMA


def _paste_max(canvas: np.ndarray, layer: np.ndarray, color: np.ndarray, x: int, y: int) -> None:
    h, w = layer.shape[:2]
    size = canvas.shape[0]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, size), min(y + h, size)
    if x0 >= x1 or y0 >= y1:
        return
    patch = layer[y0 - y : y1 - y, x0 - x : x1 - x]
    if patch.ndim == 2:
        patch = patch[..., None] * color
    np.maximum(canvas[y0:y1, x0:x1], patch, out=canvas[y0:y1, x0:x1])


def _fragment(rng: np.random.Generator, digit: np.ndarray, side: int, difficulty: float = 0.0) -> np.ndarray:
    """A crop of an upscaled digit covering at most ``_FRAGMENT_MAX_AREA`` of its 8x8 cells (up to
    all 64 as ``difficulty`` rises: clutter the size of the digit)."""
    full = _upscale(digit, side, side)
    cell = side / 8.0
    lo, hi = _FRAGMENT_CELLS[0] + 2.0 * difficulty, _FRAGMENT_CELLS[1] + 3.0 * difficulty
    max_area = _FRAGMENT_MAX_AREA + 48.0 * difficulty
    best = full[: max(2, round(3 * cell)), : max(2, round(3 * cell))]
    for _ in range(8):
        h_cells, w_cells = rng.uniform(lo, hi, size=2)
        if h_cells * w_cells > max_area:
            continue
        h, w = max(2, round(h_cells * cell)), max(2, round(w_cells * cell))
        y, x = (int(v) for v in rng.integers(0, side - np.array([h, w]) + 1))
        crop = full[y : y + h, x : x + w]
        if crop.mean() >= 0.2:
            return crop
        if crop.sum() > best.sum():
            best = crop
    return best


def render_layers(spec: DemoSpec, split: str, index: int):
    """A sample of a layered style (:data:`LAYERED_STYLES`) before JPEG: its pixels, label, box,
    stratum and the class's own layer (:class:`zoomvit.data.fine.FineRender`), from the sample's own
    random stream; :func:`render_sample` encodes exactly these pixels."""
    rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], index])
    if spec.style == "fine":
        from zoomvit.data.fine import render_fine

        return render_fine(rng, spec.image_size, _photos())
    if spec.style == "shapes":
        from zoomvit.data.shapes import render_shapes

        return render_shapes(rng, spec.image_size, _photos())
    if spec.style == "shapes2":
        from zoomvit.data.shapes2 import render_shapes2

        return render_shapes2(rng, spec.image_size)
    raise ValueError(f"style {spec.style!r} has no class layer; layered styles: {LAYERED_STYLES}")


def _render(spec: DemoSpec, split: str, index: int) -> RenderedSample:
    if spec.style in LAYERED_STYLES:
        from zoomvit.data.fine import encode_jpeg

        fine = render_layers(spec, split, index)
        x0, y0, x1, y1 = fine.box
        return RenderedSample(
            key=f"{split}_{index:08d}",
            jpeg=encode_jpeg(fine.pixels),
            label=fine.label,
            box=fine.box,
            scale=(x1 - x0) / spec.image_size,
            source_index=None,
            stratum=fine.stratum,
        )
    images, targets = _digits()
    pool = split_indices(split)
    rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], index])
    size = spec.image_size
    d = spec.difficulty
    low, high = (v * (1.0 - 0.4 * d) for v in spec.digit_scale)

    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[...] = rng.uniform(*_BACKGROUND_TINT, size=3)
    if d > 0 and rng.uniform() < d:
        photo = _photos()[int(rng.integers(len(_photos())))]
        _paste_max(
            canvas, _photo_patch(rng, photo, size) * rng.uniform(0.3, 0.3 + 0.3 * d), np.ones(3, np.float32), 0, 0
        )

    if spec.photo_clutter:
        photos = _photos()
        for _ in range(int(rng.integers(1, 3))):
            photo = photos[int(rng.integers(len(photos)))]
            side = int(rng.integers(size // 4, size // 2 + 1))
            patch = _photo_patch(rng, photo, side) * rng.uniform(*_PHOTO_INTENSITY)
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            _paste_max(canvas, patch.astype(np.float32), np.ones(3, np.float32), x, y)

    source = int(pool[int(rng.integers(len(pool)))])
    intensity = (_CLUTTER_INTENSITY[0] + 0.3 * d, _CLUTTER_INTENSITY[1] + 0.35 * d)
    saturation = (_CLUTTER_COLOR[0] * (1.0 - d), _CLUTTER_COLOR[1])
    for _ in range(spec.num_clutter + round(4 * d)):
        other = int(pool[int(rng.integers(len(pool)))])
        while other == source:
            other = int(pool[int(rng.integers(len(pool)))])
        layer = _fragment(rng, images[other], max(8, round(rng.uniform(low, high) * size)), d)
        h, w = layer.shape
        color = (rng.uniform(*intensity) * rng.uniform(*saturation, size=3)).astype(np.float32)
        x = int(rng.integers(-w // 2, size - w // 2 + 1))
        y = int(rng.integers(-h // 2, size - h // 2 + 1))
        _paste_max(canvas, layer, color, x, y)

    side = min(size, max(4, round(rng.uniform(low, high) * size)))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    color = rng.uniform(*_DIGIT_COLOR, size=3).astype(np.float32)
    _paste_max(canvas, _upscale(images[source], side, side), color, x0, y0)

    noise_std = spec.noise_std * (1.0 + 0.5 * d)
    if noise_std > 0:
        canvas += rng.normal(0.0, noise_std, size=canvas.shape).astype(np.float32)
    pixels = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return RenderedSample(
        key=f"{split}_{index:08d}",
        jpeg=buffer.getvalue(),
        label=int(targets[source]),
        box=(x0, y0, x0 + side, y0 + side),
        scale=side / size,
        source_index=source,
    )


def _photo_patch(rng: np.random.Generator, photo: np.ndarray, side: int) -> np.ndarray:
    """A random square crop of a photo, resized to ``side`` x ``side`` (RGB in [0, 1])."""
    limit = min(photo.shape[:2])
    crop_side = min(limit, int(rng.integers(side, max(side, limit // 2) + 1)))
    py = int(rng.integers(0, photo.shape[0] - crop_side + 1))
    px = int(rng.integers(0, photo.shape[1] - crop_side + 1))
    crop = photo[py : py + crop_side, px : px + crop_side]
    channels = [
        Image.fromarray(np.ascontiguousarray(crop[..., c])).resize((side, side), Image.Resampling.BILINEAR)
        for c in range(3)
    ]
    return np.stack([np.asarray(c) for c in channels], axis=-1).astype(np.float32)


def render_sample(spec: DemoSpec, split: str, index: int) -> RenderedSample:
    """Render one sample; the same ``(spec, split, index)`` always gives the same bytes."""
    if split not in _SPLIT_IDS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= index < spec.count(split):
        raise UserError(f"index {index} out of range for split {split!r} with {spec.count(split)} samples")
    return _render(spec, split, index)


def _members(sample: RenderedSample) -> Iterator[tuple[str, bytes]]:
    meta = {
        "box": list(sample.box),
        "scale": sample.scale,
        "label": sample.label,
        "filename": f"{sample.key}.jpg",
    }
    if sample.source_index is not None:
        meta["source_index"] = sample.source_index
    if sample.stratum is not None:
        meta["stratum"] = sample.stratum
    yield f"{sample.key}.jpg", sample.jpeg
    yield f"{sample.key}.cls", f"{sample.label}".encode("ascii")
    yield f"{sample.key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = TAR_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))

    write_durably(path, write)


def is_demo_dataset(root: str | os.PathLike[str]) -> bool:
    """Whether ``root``'s ``_info.json`` says this generator wrote it."""
    path = Path(root) / "_info.json"
    try:
        return json.loads(path.read_text()).get("name") == DATASET_NAME
    except (OSError, ValueError, AttributeError):
        return False


def generate_demo_dataset(
    out_dir: str | os.PathLike[str],
    *,
    train: int,
    val: int,
    image_size: int | None = None,
    seed: int = 0,
    samples_per_shard: int = 256,
    digit_scale: tuple[float, float] = (0.18, 0.45),
    num_clutter: int = 6,
    noise_std: float = 0.08,
    photo_clutter: bool = False,
    difficulty: float = 0.0,
    style: str = "digits",
) -> dict[str, Any]:
    """Write ``train-NNNNNN.tar``/``val-NNNNNN.tar`` shards, ``classes.txt`` and ``_info.json`` into out_dir.

    Shards from an earlier generation in out_dir that the new one does not overwrite are removed,
    so the directory always holds exactly the split listed in ``_info.json``. A directory holding
    shards this generator did not write (no ``_info.json`` of ours) is refused: those may be a
    user's dataset. ``image_size`` None: the style's own (128 for the fine, shapes and shapes2
    styles, else 64). Returns that info dict.
    """
    spec = DemoSpec(
        train=train,
        val=val,
        image_size=image_size,
        seed=seed,
        samples_per_shard=samples_per_shard,
        digit_scale=tuple(digit_scale),
        num_clutter=num_clutter,
        noise_std=noise_std,
        photo_clutter=photo_clutter,
        difficulty=difficulty,
        style=style,
    )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if any(_SHARD_RE.match(p.name) for p in out.iterdir()) and not is_demo_dataset(out):
        raise UserError(
            f"{str(out)!r} holds train-/val- shards that the demo generator did not write (its _info.json does not "
            "name the demo dataset): refusing to overwrite them. Write the demo data elsewhere."
        )

    splits: dict[str, dict[str, Any]] = {}
    written: set[str] = set()
    for split in SPLITS:
        n = spec.count(split)
        lengths: list[int] = []
        filenames: list[str] = []
        for shard, start in enumerate(range(0, n, spec.samples_per_shard)):
            stop = min(start + spec.samples_per_shard, n)
            members = [m for i in range(start, stop) for m in _members(_render(spec, split, i))]
            name = f"{split}-{shard:06d}.tar"
            _write_tar(out / name, members)
            lengths.append(stop - start)
            filenames.append(name)
        written.update(filenames)
        splits[split] = {"name": split, "num_samples": n, "shard_lengths": lengths, "filenames": filenames}

    for stale in out.iterdir():
        if _SHARD_RE.match(stale.name) and stale.name not in written:
            stale.unlink()

    info: dict[str, Any] = {
        "name": DATASET_NAME,
        "version": __version__,
        "num_classes": len(CLASS_NAMES),
        "splits": splits,
        "generator": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()},
    }
    names = class_names(spec.style)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    (out / "_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return info
