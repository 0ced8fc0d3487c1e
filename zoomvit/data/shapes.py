"""The ``shapes`` demo preset: a benchmark whose class is a small *shape* at any pixel offset, built
for no model's grid.

Every image is stored at ``image_size`` (twice the model's input: 128 px for a 64 px model) over a
crop of a real photograph (scikit-learn's bundled sample photos). The object is a round grey plate
with a saturated coloured rim (the *where*, visible at any input size) holding one of ten stroke
glyphs (the class, :data:`CLASS_NAMES`). A glyph is drawn analytically (each pixel's coverage from its
distance to the glyph's strokes), so its centre lies anywhere, sub-pixel, with a small random
rotation, size and stroke width: no class pattern lines up with any patch grid, and the class does
not change with the offset.

- ``fine`` stratum (3 in 4 images): the plate is :data:`FINE_SIDE` of the image side and the glyph
  spans about 0.57 of it (16 to 24 px at 128 px: 2 to 3 of ZoomViT's 8 px zoomed tokens across, 1 to
  2 of the 64 px model's 16 px cells), strokes 2.5 to 3.5 px wide. The glyph is drawn as the
  *envelope* of the pixel checkerboard: its coverage, smoothed to below :data:`ENVELOPE_BAND`'s 0.22
  cycles/px, times ``(-1)^(x + y)``. Every class shares that carrier; only the shape differs. All of
  the glyph's energy then lies above 0.28 cycles/px in both axes, above a half-size view's Nyquist
  frequency (0.25): a
  64 px decode shows the rimmed plate and nothing of the glyph, a 128 px decode shows the shape,
  and sizes between keep an aliased part of it (``zoomvit probe`` measures how much). A shift of
  one pixel flips the carrier's sign under the shape, nothing else.
- ``coarse`` stratum (1 in 4): the plate is :data:`COARSE_SIDE` of the side and the same glyph is
  drawn large and plain (strokes 3 to 4.5 px, dark or light): readable at any input size.

Clutter (the *which* is nowhere at low resolution, the *where* is the rim): 2 to 4 random scribbles
drawn like the fine glyphs, and in half the images a decoy plate of the same grey without the
coloured rim holding such a scribble at the fine glyph's size. A scribble is a random open polyline
of three segments, no class. Sensor noise (:data:`NOISE_STD`) on everything.

The ``.json`` records the plate's box (the pixels it touches) and ``stratum``. Everything is drawn
from the sample's own random stream, so the bytes depend only on the arguments.

The settings were chosen on the development split (generator seed 1) by the probe; the versions it
measured are in ``bench/results/probe_shapes_versions.json`` and docs/results.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from zoomvit.data.fine import FineRender, _frame_colour, _photo_background

STRATA: tuple[str, ...] = ("fine", "coarse")
COARSE_SHARE = 0.25
FINE_SIDE = (0.22, 0.30)  # the plate's diameter, of the image side
COARSE_SIDE = (0.5, 0.7)
GLYPH_SCALE = (0.31, 0.36)  # the glyph's unit (its extent is about 1.7 units), of the plate's diameter
ROTATION_DEG = 15.0
FINE_STROKE = (2.5, 3.5)  # px at the stored size
COARSE_STROKE = (3.0, 4.5)
ENVELOPE_BAND = (0.12, 0.22)  # cycles/px: the fine envelope keeps what is below the first, nothing above the second
FINE_AMPLITUDE = (0.25, 0.35)  # the carrier's amplitude on the 0..1 scale: on a plate of 0.4..0.6, never clipped
COARSE_CONTRAST = (0.25, 0.4)
PLATE_GREY = (0.4, 0.6)
NOISE_STD = 0.03
RIM = 1 / 40  # of the image side
DISTRACTORS = (2, 4)
DECOY_PROBABILITY = 0.5
PATCH = 64  # px: the window a fine glyph's envelope is computed in


def _circle(radius: float, n: int = 32) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n + 1)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _lines(*points: Sequence[tuple[float, float]]) -> list[np.ndarray]:
    return [np.asarray(p, dtype=np.float64) for p in points]


# The classes: polylines in unit coordinates (x right, y down, the glyph within [-0.85, 0.85]).
GLYPHS: dict[str, list[np.ndarray]] = {
    "ring": [_circle(0.78)],
    "plus": _lines([(-0.85, 0), (0.85, 0)], [(0, -0.85), (0, 0.85)]),
    "cross": _lines([(-0.7, -0.7), (0.7, 0.7)], [(-0.7, 0.7), (0.7, -0.7)]),
    "triangle": _lines([(0, -0.82), (0.8, 0.62), (-0.8, 0.62), (0, -0.82)]),
    "square": _lines([(-0.68, -0.68), (0.68, -0.68), (0.68, 0.68), (-0.68, 0.68), (-0.68, -0.68)]),
    "zigzag": _lines([(-0.85, -0.6), (-0.3, 0.6), (0.3, -0.6), (0.85, 0.6)]),
    "tee": _lines([(-0.8, -0.75), (0.8, -0.75)], [(0, -0.75), (0, 0.85)]),
    "arrow": _lines([(0, 0.85), (0, -0.85)], [(-0.6, -0.25), (0, -0.85), (0.6, -0.25)]),
    "hourglass": _lines([(-0.7, -0.75), (0.7, -0.75), (-0.7, 0.75), (0.7, 0.75), (-0.7, -0.75)]),
    "bars": _lines([(-0.8, -0.6), (0.8, -0.6)], [(-0.8, 0), (0.8, 0)], [(-0.8, 0.6), (0.8, 0.6)]),
}
CLASS_NAMES: tuple[str, ...] = tuple(GLYPHS)

# A coverage function: (canvas shape, centre in px, unit in px, angle in radians) -> coverage in [0, 1].
Coverage = Callable[[tuple[int, int], tuple[float, float], float, float], np.ndarray]


def _window(shape: tuple[int, int], centre: tuple[float, float], reach: float) -> tuple[int, int, int, int] | None:
    """The pixels within ``reach`` of ``centre`` (x0, y0, x1, y1), clipped to the canvas; None if none."""
    x0, y0 = max(0, math.floor(centre[0] - reach)), max(0, math.floor(centre[1] - reach))
    x1, y1 = min(shape[1], math.ceil(centre[0] + reach)), min(shape[0], math.ceil(centre[1] + reach))
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


def unit_coordinates(shape: tuple[int, int], centre: tuple[float, float], unit: float, angle: float) -> np.ndarray:
    """Every pixel centre of a ``shape`` canvas in a shape's unit coordinates (its centre at ``centre``
    px, one unit ``unit`` px, turned by ``angle`` radians): (H*W, 2)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) + 0.5
    dx, dy = xs.ravel() - centre[0], ys.ravel() - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * dx + s * dy, -s * dx + c * dy], axis=1) / unit


def distance_to_segments(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each point's distance to the nearest segment ``a[i] -> b[i]``: (N,)."""
    ab = b - a
    t = np.clip(((points[:, None, :] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    return np.sqrt((((points[:, None, :] - (a + t[..., None] * ab)) ** 2).sum(-1)).min(axis=1))


def strokes_coverage(strokes: Sequence[np.ndarray], width: float) -> Coverage:
    """The coverage of ``strokes`` (polylines in unit coordinates) drawn ``width`` px wide, antialiased:
    a continuous function of the centre, which may be any real position."""
    a = np.concatenate([s[:-1] for s in strokes])
    b = np.concatenate([s[1:] for s in strokes])
    extent = float(np.abs(np.concatenate([a, b])).max()) * math.sqrt(2)

    def draw(shape: tuple[int, int], centre: tuple[float, float], unit: float, angle: float) -> np.ndarray:
        out = np.zeros(shape, dtype=np.float32)
        box = _window(shape, centre, extent * unit + width + 2)
        if box is None:
            return out
        x0, y0, x1, y1 = box
        points = unit_coordinates((y1 - y0, x1 - x0), (centre[0] - x0, centre[1] - y0), unit, angle)
        distance = distance_to_segments(points, a, b) * unit
        out[y0:y1, x0:x1] = np.clip(width / 2 - distance + 0.5, 0.0, 1.0).reshape(y1 - y0, x1 - x0)
        return out

    return draw


def disk_coverage(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) + 0.5
    distance = np.hypot(xs - centre[0], ys - centre[1])
    return np.clip(radius - distance + 0.5, 0.0, 1.0).astype(np.float32)


def low_pass(layer: np.ndarray, band: tuple[float, float] = ENVELOPE_BAND) -> np.ndarray:
    """``layer`` through a (zero-padded) Fourier filter ``L(fx) L(fy)``: ``L`` 1 below ``band[0]``
    cycles/px, 0 above ``band[1]``, a raised cosine between."""
    h, w = layer.shape
    fy = np.abs(np.fft.fftfreq(2 * h))[:, None]
    fx = np.abs(np.fft.rfftfreq(2 * w))[None, :]

    def gain(f: np.ndarray) -> np.ndarray:
        ramp = np.clip((f - band[0]) / (band[1] - band[0]), 0.0, 1.0)
        return 0.5 * (1.0 + np.cos(math.pi * ramp))

    spectrum = np.fft.rfft2(layer.astype(np.float64), s=(2 * h, 2 * w))
    return np.fft.irfft2(spectrum * gain(fx) * gain(fy), s=(2 * h, 2 * w))[:h, :w].astype(np.float32)


def fine_layer(coverage: Coverage, size: int, centre: tuple[float, float], unit: float, angle: float) -> np.ndarray:
    """A shape drawn for the fine stratum on a ``size`` x ``size`` canvas: its coverage smoothed below
    :data:`ENVELOPE_BAND`, times the pixel checkerboard ``(-1)^(x + y)`` of the canvas (in [-1, 1]).
    Computed in a :data:`PATCH` px window at the integer pixel below ``centre``, so the result depends
    on ``centre`` through that pixel and the exact sub-pixel remainder."""
    ox, oy = math.floor(centre[0]) - PATCH // 2, math.floor(centre[1]) - PATCH // 2
    envelope = low_pass(coverage((PATCH, PATCH), (centre[0] - ox, centre[1] - oy), unit, angle))
    ys, xs = np.mgrid[oy : oy + PATCH, ox : ox + PATCH]
    patch = envelope * np.where((xs + ys) % 2 == 0, 1.0, -1.0).astype(np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + PATCH, size), min(oy + PATCH, size)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = patch[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return out


def scribble(rng: np.random.Generator) -> list[np.ndarray]:
    """A random open polyline of three segments within the unit square: clutter, no class."""
    heading = rng.uniform(0, 2 * math.pi)
    points = [rng.uniform(-0.7, 0.7, size=2)]
    for _ in range(3):
        heading += rng.uniform(0.6, 2.2) * rng.choice([-1.0, 1.0])
        step = rng.uniform(0.7, 1.3)
        points.append(np.clip(points[-1] + step * np.array([math.cos(heading), math.sin(heading)]), -0.85, 0.85))
    return [np.stack(points)]


def place(
    rng: np.random.Generator, size: int, side: float, avoid: Sequence[tuple[float, float, float]]
) -> tuple[float, float]:
    """A real-valued centre for a ``side`` wide object inside the image, clear of the ``avoid`` objects
    ``(cx, cy, side)`` (as disks; best effort)."""
    cx = cy = size / 2
    for _ in range(50):
        cx, cy = rng.uniform(side / 2, size - side / 2, size=2)
        if all(math.hypot(cx - x, cy - y) >= (side + d) / 2 for x, y, d in avoid):
            break
    return float(cx), float(cy)


def pixel_box(cx: float, cy: float, side: float, size: int) -> tuple[int, int, int, int]:
    """The pixels a ``side`` wide square centred at (cx, cy) touches."""
    r = side / 2
    return (max(0, math.floor(cx - r)), max(0, math.floor(cy - r)), min(size, math.ceil(cx + r)),
            min(size, math.ceil(cy + r)))  # fmt: skip


def draw_glyph(
    rng: np.random.Generator, stratum: str, coverage: Coverage, size: int, centre: tuple[float, float], unit: float
) -> np.ndarray:
    """The class's own layer (H, W, 3): ``coverage`` drawn for ``stratum`` at ``centre`` with a random
    rotation (fine: the checkerboard's envelope at a random amplitude; coarse: plain, dark or light)."""
    angle = math.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    if stratum == "fine":
        glyph = rng.uniform(*FINE_AMPLITUDE) * fine_layer(coverage, size, centre, unit, angle)
    else:
        sign = rng.choice([-1.0, 1.0])
        glyph = sign * rng.uniform(*COARSE_CONTRAST) * coverage((size, size), centre, unit, angle)
    return np.repeat(glyph[..., None], 3, axis=-1).astype(np.float32)


def render_shapes(rng: np.random.Generator, size: int, photos: tuple[np.ndarray, ...]) -> FineRender:
    """Render one ``shapes``-preset image of ``size`` px from its random stream ``rng``."""
    canvas = _photo_background(rng, photos, size)
    stratum = "coarse" if rng.uniform() < COARSE_SHARE else "fine"
    side = rng.uniform(*(COARSE_SIDE if stratum == "coarse" else FINE_SIDE)) * size
    cx, cy = (float(v) for v in rng.uniform(side / 2, size - side / 2, size=2))
    label = int(rng.integers(len(CLASS_NAMES)))
    unit = rng.uniform(*GLYPH_SCALE) * side

    avoid = [(cx, cy, side)]
    for _ in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))):
        d = rng.uniform(*FINE_SIDE) * size
        centre = place(rng, size, 0.7 * d, avoid)
        shape = strokes_coverage(scribble(rng), rng.uniform(*FINE_STROKE))
        layer = fine_layer(shape, size, centre, rng.uniform(*GLYPH_SCALE) * d, rng.uniform(0, 2 * math.pi))
        canvas += (rng.uniform(*FINE_AMPLITUDE) * layer)[..., None]
    canvas = np.clip(canvas, 0.0, 1.0)

    if rng.uniform() < DECOY_PROBABILITY:
        d = rng.uniform(*FINE_SIDE) * size
        centre = place(rng, size, d, avoid)
        plate = disk_coverage((size, size), centre, d / 2)[..., None]
        canvas = canvas * (1 - plate) + plate * rng.uniform(*PLATE_GREY)
        shape = strokes_coverage(scribble(rng), rng.uniform(*FINE_STROKE))
        canvas += draw_glyph(rng, "fine", shape, size, centre, rng.uniform(*GLYPH_SCALE) * d)

    rim = size * RIM
    outer = disk_coverage((size, size), (cx, cy), side / 2)[..., None]
    inner = disk_coverage((size, size), (cx, cy), side / 2 - rim)[..., None]
    canvas = canvas * (1 - outer) + (outer - inner) * _frame_colour(rng) + inner * rng.uniform(*PLATE_GREY)
    width = rng.uniform(*(COARSE_STROKE if stratum == "coarse" else FINE_STROKE))
    glyph = draw_glyph(rng, stratum, strokes_coverage(GLYPHS[CLASS_NAMES[label]], width), size, (cx, cy), unit)
    canvas = canvas + glyph
    canvas += rng.normal(0.0, NOISE_STD, size=canvas.shape).astype(np.float32)
    return FineRender(pixels=np.clip(canvas, 0.0, 1.0).astype(np.float32), label=label,
                      box=pixel_box(cx, cy, side, size), stratum=stratum, glyph_layer=glyph)  # fmt: skip
