"""The ``fine`` demo preset: a benchmark on which zoom *can* pay, because the class lives in detail
that a uniform low-resolution view cannot resolve.

Every image is stored at ``image_size`` (twice the model's input: 128 px for a 64 px model) over a
real photograph (scikit-learn's bundled sample photos). The object is a flat grey panel with a
saturated coloured frame; inside it, a real handwritten digit (scikit-learn's UCI digits, the
class) is drawn in one of two strata:

- ``fine`` (3 in 4 images): the panel's side is 1/4 to 3/8 of the image (2x2 to 3x3 cells of an
  8x8 patch grid) and the digit exists only as the *amplitude of a pixel checkerboard*,
  ``grey + A * mask * (-1)^(x+y)``. All of its energy sits at the stored image's Nyquist frequency,
  twice the Nyquist frequency of a half-size view: a 2x down-sampling averages every 2x2 block to
  the panel's grey, so the 64 px view shows a blank framed panel (*where*, not *which*), the 128 px
  view the digit. Intermediate sizes keep an aliased, attenuated part of it.
- ``coarse`` (1 in 4): the panel is 1/2 to 0.7 of the image and the digit is drawn in plain
  (low-frequency) strokes, brighter or darker than the panel: readable at any input size.

Clutter: the photo background, checkerboard fragments of other digits on it (the same fine-band
texture, no panel), and in half the images a decoy panel of the same grey without the frame,
holding the checkerboard of a scrambled digit (the style of an object, no class).

The ``.json`` records the object's box and ``stratum``. Geometry is drawn from the sample's own
random stream; glyphs are UCI digits up-sampled with PIL's bicubic filter, so the bytes depend only
on the arguments and the bundled data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_QUALITY = 95
STRATA: tuple[str, ...] = ("fine", "coarse")
COARSE_SHARE = 0.25
FINE_SIDE = (0.25, 0.375)  # of the image side: 2x2 to 3x3 cells of an 8x8 grid
COARSE_SIDE = (0.5, 0.7)
_CHECKER_AMPLITUDE = (0.2, 0.28)
_COARSE_CONTRAST = (0.25, 0.4)
_PANEL_GREY = (0.4, 0.6)
_PHOTO_BRIGHTNESS = (0.45, 0.9)
_NOISE_STD = 0.01
_DISTRACTORS = (2, 4)
_DECOY_PROBABILITY = 0.5


@dataclass(frozen=True)
class FineRender:
    """One rendered image (floats in [0, 1], before JPEG), its object, and the digit's own layer (what
    the image would lose without the class: the probe measures how much of it survives a resize)."""

    pixels: np.ndarray
    label: int
    box: tuple[int, int, int, int]
    stratum: str
    source_index: int
    glyph_layer: np.ndarray


def checker(size: int) -> np.ndarray:
    """``(-1)^(x+y)`` on a ``size`` x ``size`` image: the carrier the fine digits ride on."""
    idx = np.arange(size)
    return np.where((idx[:, None] + idx[None, :]) % 2 == 0, 1.0, -1.0).astype(np.float32)


def glyph_mask(cells: np.ndarray, side: int) -> np.ndarray:
    """A UCI digit (8x8 in [0, 1]) as a soft-edged stroke mask of ``side`` x ``side`` in [0, 1]."""
    img = Image.fromarray(np.ascontiguousarray(cells, dtype=np.float32))
    up = np.asarray(img.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip((up - 0.25) / 0.35, 0.0, 1.0)


def scrambled(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit's 8x8 image with its sixteen 2x2 blocks shuffled: strokes, but no digit."""
    blocks = cells.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 2, 2)
    blocks = blocks[rng.permutation(16)]
    return blocks.reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(8, 8)


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
        x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(x + side <= a[0] or a[2] <= x or y + side <= a[1] or a[3] <= y for a in avoid):
            break
    return x, y


def _frame_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0, 6)
    k = int(hue) % 6
    f = hue - int(hue)
    rgb = [(1, f, 0), (1 - f, 1, 0), (0, 1, f), (0, 1 - f, 1), (f, 0, 1), (1, 0, 1 - f)][k]
    return np.asarray(rgb, dtype=np.float32) * 0.9 + 0.05


def render_fine(
    rng: np.random.Generator,
    size: int,
    digits: np.ndarray,
    targets: np.ndarray,
    pool: np.ndarray,
    photos: tuple[np.ndarray, ...],
) -> FineRender:
    """Render one ``fine``-preset image of ``size`` px from its random stream ``rng`` (digits drawn from
    ``pool``, indices into ``digits``/``targets``)."""
    carrier = checker(size)
    canvas = _photo_background(rng, photos, size)
    stratum = "coarse" if rng.uniform() < COARSE_SHARE else "fine"
    lo, hi = COARSE_SIDE if stratum == "coarse" else FINE_SIDE
    side = max(8, round(rng.uniform(lo, hi) * size))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    source = int(pool[int(rng.integers(len(pool)))])

    def other_digit() -> int:
        while True:
            other = int(pool[int(rng.integers(len(pool)))])
            if other != source:
                return other

    def textured(cells: np.ndarray, x: int, y: int, side: int, amplitude: float, layer: np.ndarray) -> None:
        h = w = side
        x1, y1 = min(x + w, size), min(y + h, size)
        mask = glyph_mask(cells, side)[: y1 - y, : x1 - x]
        layer[y:y1, x:x1] += (amplitude * mask * carrier[y:y1, x:x1])[..., None]

    clutter = np.zeros_like(canvas)
    for _ in range(int(rng.integers(_DISTRACTORS[0], _DISTRACTORS[1] + 1))):
        frag = max(8, round(rng.uniform(*FINE_SIDE) * size * 0.8))
        fx, fy = _place(rng, size, frag, [box])
        textured(digits[other_digit()], fx, fy, frag, rng.uniform(*_CHECKER_AMPLITUDE), clutter)
    canvas = np.clip(canvas + clutter, 0.0, 1.0)

    if rng.uniform() < _DECOY_PROBABILITY:
        dside = max(8, round(rng.uniform(*FINE_SIDE) * size))
        dx, dy = _place(rng, size, dside, [box])
        canvas[dy : dy + dside, dx : dx + dside] = rng.uniform(*_PANEL_GREY)
        decoy = np.zeros_like(canvas)
        inner = max(4, dside - 2 * max(2, round(dside / 10)))
        off = (dside - inner) // 2
        textured(
            scrambled(digits[other_digit()], rng), dx + off, dy + off, inner, rng.uniform(*_CHECKER_AMPLITUDE), decoy
        )
        canvas = np.clip(canvas + decoy, 0.0, 1.0)

    frame = max(2, round(size / 32))
    canvas[y0 : y0 + side, x0 : x0 + side] = _frame_colour(rng)
    grey = rng.uniform(*_PANEL_GREY)
    canvas[y0 + frame : y0 + side - frame, x0 + frame : x0 + side - frame] = grey
    inner = side - 2 * frame - 2 * max(1, round(side / 16))
    off = (side - inner) // 2
    glyph = np.zeros_like(canvas)
    if stratum == "fine":
        textured(digits[source], x0 + off, y0 + off, inner, rng.uniform(*_CHECKER_AMPLITUDE), glyph)
    else:
        sign = 1.0 if rng.uniform() < 0.5 else -1.0
        mask = glyph_mask(digits[source], inner)
        glyph[y0 + off : y0 + off + inner, x0 + off : x0 + off + inner] = (
            sign * rng.uniform(*_COARSE_CONTRAST) * mask
        )[..., None]
    canvas = canvas + glyph
    canvas += rng.normal(0.0, _NOISE_STD, size=canvas.shape).astype(np.float32)
    return FineRender(
        pixels=np.clip(canvas, 0.0, 1.0),
        label=int(targets[source]),
        box=box,
        stratum=stratum,
        source_index=source,
        glyph_layer=glyph,
    )


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Pixels in [0, 1] as a JPEG without chroma subsampling (4:4:4), so fine detail survives storage."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    return buffer.getvalue()
