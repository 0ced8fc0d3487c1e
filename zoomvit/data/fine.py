"""The ``fine`` demo preset: a benchmark on which zoom *can* pay, because the class lives in detail
that a uniform low-resolution view cannot resolve.

Every image is stored at ``image_size`` (twice the model's input: 128 px for a 64 px model) over a
real photograph (scikit-learn's bundled sample photos). The object is a flat grey panel with a
saturated coloured frame, filled with one of ten **textures** (the class). A texture is a 4 x 4 px
tile repeated over the panel, anchored to the image grid, and built from four 2 x 2 blocks that each
sum to zero (a checkerboard, a horizontal or a vertical pair of stripes, or their negatives), so:

- ``fine`` stratum (3 in 4 images): the panel's side is 1/4 to 3/8 of the image (2x2 to 3x3 cells of
  an 8x8 patch grid) and the tile is drawn at full resolution. All of its energy lies at the stored
  image's Nyquist frequency in x or y, twice the Nyquist frequency of a half-size view: a 2x
  down-sampling averages every 2 x 2 block to the panel's grey, so the 64 px view shows a blank framed
  panel (*where*, not *which*); the 128 px view shows the texture in every 8 x 8 patch of the panel.
  Intermediate sizes keep an aliased, attenuated part of it (``zoomvit probe`` measures how much).
- ``coarse`` stratum (1 in 4): the panel is 1/2 to 0.7 of the image and the same tile is drawn 4x
  larger (8 x 8 px blocks): readable at any input size.

Clutter: the photo background; texture patches of the same fine band on it (tiles that are no
class); and in half the images a decoy panel of the same grey without the frame, filled with such a
tile (the style of an object, no class).

The ``.json`` records the object's box and ``stratum``. Everything is drawn from the sample's own
random stream and a fixed table of tiles, so the bytes depend only on the arguments.

The first version drew a handwritten digit as the amplitude of a pixel checkerboard. Its probe was
as intended (a crop CNN: 94% at 128 px, 10% at 64 px), but the demo-sized ViTs did not learn it from
scratch within the CPU budget (val top-1 at chance after 1,100 steps on the development split), so
the class moved from a shape spread over several tokens to a texture every token of the panel shows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

JPEG_QUALITY = 95
STRATA: tuple[str, ...] = ("fine", "coarse")
NUM_TEXTURES = 10
COARSE_SHARE = 0.25
FINE_SIDE = (0.25, 0.375)  # of the image side: 2x2 to 3x3 cells of an 8x8 grid
COARSE_SIDE = (0.5, 0.7)
COARSE_SCALE = 4  # the coarse stratum's tile is drawn this much larger
_AMPLITUDE = (0.25, 0.35)
_PANEL_GREY = (0.4, 0.6)
_PHOTO_BRIGHTNESS = (0.35, 0.8)
_NOISE_STD = 0.01
_DISTRACTORS = (2, 4)
_DECOY_PROBABILITY = 0.5
_CLUTTER_TILES = 1024


@dataclass(frozen=True)
class FineRender:
    """One rendered image (floats in [0, 1], before JPEG), its object, and the class's own layer (what
    the image would lose without its texture: the probe measures how much of it survives a resize)."""

    pixels: np.ndarray
    label: int
    box: tuple[int, int, int, int]
    stratum: str
    glyph_layer: np.ndarray


@lru_cache(maxsize=1)
def tiles() -> np.ndarray:
    """8 x 8 tiles made of 4 x 4 checkerboard blocks of 2 x 2 px, each block's sign its own, in {-1, 1}:
    of a fixed shuffle of all 2^16, the first :data:`NUM_TEXTURES` that differ from each other's
    block-aligned shifts and sign flips in at least 4 of 16 blocks are the classes; the next
    ``_CLUTTER_TILES`` that are no such shift or flip of a class are clutter."""
    bits = (np.arange(1 << 16)[:, None] >> np.arange(16)[None, :]) & 1
    signs = (2 * bits - 1).reshape(-1, 4, 4).astype(np.int8)
    signs = signs[np.random.default_rng(20261206).permutation(len(signs))]

    def variants(s: np.ndarray) -> np.ndarray:  # (32, 4, 4): every block-aligned shift, both signs
        shifted = np.stack([np.roll(s, (dy, dx), axis=(0, 1)) for dy in range(4) for dx in range(4)])
        return np.concatenate([shifted, -shifted])

    chosen: list[int] = []
    for i in range(len(signs)):
        if all((variants(signs[i]) != signs[j]).sum(axis=(1, 2)).min() >= 4 for j in chosen):
            chosen.append(i)
        if len(chosen) == NUM_TEXTURES:
            break
    mimics = {v.tobytes() for i in chosen for v in variants(signs[i])}
    rest = [i for i in range(len(signs)) if signs[i].tobytes() not in mimics][:_CLUTTER_TILES]
    order = np.asarray(chosen + rest)
    checker = np.where(np.add.outer(np.arange(8), np.arange(8)) % 2 == 0, 1, -1)
    return (np.kron(signs[order], np.ones((2, 2), dtype=np.int8)) * checker).astype(np.float32)


def texture(tile: np.ndarray, size: int, scale: int = 1) -> np.ndarray:
    """``tile`` repeated over a ``size`` x ``size`` image, anchored at the origin, each pixel ``scale`` x ``scale``."""
    big = np.kron(tile, np.ones((scale, scale), dtype=np.float32))
    reps = -(-size // big.shape[0])
    return np.tile(big, (reps, reps))[:size, :size]


def _even(value: float) -> int:
    """Rounded down to an even pixel (>= 2): every textured region starts and ends on the 2 x 2 grid, so
    a half-size view averages whole blocks (a partial block at an edge would leak its sign)."""
    return max(2, int(value) // 2 * 2)


def _photo_background(rng: np.random.Generator, photos: tuple[np.ndarray, ...], size: int) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    limit = min(photo.shape[:2])
    side = int(rng.integers(max(size, limit // 3), limit + 1))
    y = int(rng.integers(0, photo.shape[0] - side + 1))
    x = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = (np.clip(photo[y : y + side, x : x + side], 0, 1) * 255).astype(np.uint8)
    out = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return out * rng.uniform(*_PHOTO_BRIGHTNESS)


def _place(rng: np.random.Generator, size: int, side: int, avoid: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """A top-left corner for a ``side`` square that does not overlap the ``avoid`` boxes (best effort)."""
    x = y = 0
    for _ in range(50):
        x, y = (_even(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(x + side <= a[0] or a[2] <= x or y + side <= a[1] or a[3] <= y for a in avoid):
            break
    return x, y


def _frame_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0, 6)
    k = int(hue) % 6
    f = hue - int(hue)
    rgb = [(1, f, 0), (1 - f, 1, 0), (0, 1, f), (0, 1 - f, 1), (f, 0, 1), (1, 0, 1 - f)][k]
    return np.asarray(rgb, dtype=np.float32) * 0.9 + 0.05


def render_fine(rng: np.random.Generator, size: int, photos: tuple[np.ndarray, ...]) -> FineRender:
    """Render one ``fine``-preset image of ``size`` px from its random stream ``rng``."""
    table = tiles()
    canvas = _photo_background(rng, photos, size)
    stratum = "coarse" if rng.uniform() < COARSE_SHARE else "fine"
    lo, hi = COARSE_SIDE if stratum == "coarse" else FINE_SIDE
    side = _even(rng.uniform(lo, hi) * size)
    x0, y0 = (_even(v) for v in rng.integers(0, size - side + 1, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    label = int(rng.integers(NUM_TEXTURES))

    def clutter_tile() -> np.ndarray:
        return table[int(rng.integers(NUM_TEXTURES, len(table)))]

    for _ in range(int(rng.integers(_DISTRACTORS[0], _DISTRACTORS[1] + 1))):
        frag = _even(rng.uniform(*FINE_SIDE) * size * 0.8)
        fx, fy = _place(rng, size, frag, [box])
        patch = texture(clutter_tile(), size)[fy : fy + frag, fx : fx + frag]
        canvas[fy : fy + frag, fx : fx + frag] += (rng.uniform(*_AMPLITUDE) * patch)[..., None]
    canvas = np.clip(canvas, 0.0, 1.0)

    if rng.uniform() < _DECOY_PROBABILITY:
        dside = _even(rng.uniform(*FINE_SIDE) * size)
        dx, dy = _place(rng, size, dside, [box])
        decoy = texture(clutter_tile(), size)[dy : dy + dside, dx : dx + dside]
        canvas[dy : dy + dside, dx : dx + dside] = (rng.uniform(*_PANEL_GREY) + rng.uniform(*_AMPLITUDE) * decoy)[
            ..., None
        ]

    frame = _even(size / 32)
    canvas[y0 : y0 + side, x0 : x0 + side] = _frame_colour(rng)
    canvas[y0 + frame : y0 + side - frame, x0 + frame : x0 + side - frame] = rng.uniform(*_PANEL_GREY)
    scale = COARSE_SCALE if stratum == "coarse" else 1
    glyph = np.zeros_like(canvas)
    inner = (slice(y0 + frame, y0 + side - frame), slice(x0 + frame, x0 + side - frame))
    glyph[inner] = (rng.uniform(*_AMPLITUDE) * texture(table[label], size, scale)[inner])[..., None]
    canvas = canvas + glyph
    canvas += rng.normal(0.0, _NOISE_STD, size=canvas.shape).astype(np.float32)
    return FineRender(pixels=np.clip(canvas, 0.0, 1.0), label=label, box=box, stratum=stratum, glyph_layer=glyph)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Pixels in [0, 1] as a JPEG without chroma subsampling (4:4:4), so fine detail survives storage."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    return buffer.getvalue()
