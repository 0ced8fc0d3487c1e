"""The ``shapes2`` demo preset: a second set for the ``shapes`` benchmark's verdict, built by another
generator: another shape family, other backgrounds, other clutter, the same construction.

Its settings were fixed in this file before it was first run, from the ``shapes`` preset's chosen
ones (:mod:`zoomvit.data.shapes`), and are not tuned on it. What is the same: images stored at
``image_size`` (128 px for a 64 px model); the strata (``fine`` 3 in 4, ``coarse`` 1 in 4) and their
object sizes; the fine drawing (a shape's coverage smoothed below a quarter of the sampling rate,
times the pixel checkerboard, at the same amplitude), the rotation, the sensor noise; objects at any
sub-pixel offset. What differs:

- the classes are ten **filled silhouettes** (:data:`CLASS_NAMES`: polygons, even-odd filled), not
  stroke glyphs; the coarse stratum draws them large and plain;
- the object is a **square** grey plate with a saturated coloured rim, the decoy a square plate
  without it;
- the background is **procedural noise** (three fields with a 1/f^b spectrum mixed by a random
  colour matrix), not a photograph;
- the clutter is 2 to 4 random star-shaped polygons drawn like the fine silhouettes and 1 to 3 plain
  translucent coloured ellipses, not scribbles.

The ``.json`` records the plate's box and ``stratum``; the bytes depend only on the arguments (each
sample its own random stream).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from zoomvit.data.fine import FineRender, _frame_colour
from zoomvit.data.shapes import (
    COARSE_SHARE,
    COARSE_SIDE,
    DECOY_PROBABILITY,
    DISTRACTORS,
    FINE_AMPLITUDE,
    FINE_SIDE,
    GLYPH_SCALE,
    NOISE_STD,
    PLATE_GREY,
    RIM,
    Coverage,
    _window,
    distance_to_segments,
    draw_glyph,
    fine_layer,
    pixel_box,
    place,
    unit_coordinates,
)

_BACKGROUND_EXPONENT = (1.0, 1.6)  # amplitude ~ 1/f^b
_BACKGROUND_RANGE = (0.05, 0.85)
_BLOBS = (1, 3)
_BLOB_SIDE = (0.1, 0.3)  # of the image side
_BLOB_OPACITY = (0.3, 0.7)


def _arc(cx: float, cy: float, r: float, start_deg: float, stop_deg: float, n: int = 16) -> np.ndarray:
    t = np.radians(np.linspace(start_deg, stop_deg, n))
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _crescent() -> list[np.ndarray]:
    """A disk of radius 0.8 less a disk of radius 0.65 centred 0.35 to its right, as one contour."""
    x = (0.8**2 - 0.65**2 + 0.35**2) / (2 * 0.35)
    y = math.sqrt(0.8**2 - x**2)
    outer = math.degrees(math.atan2(y, x))
    inner = math.degrees(math.atan2(y, x - 0.35))
    return [np.concatenate([_arc(0, 0, 0.8, outer, 360 - outer, 24), _arc(0.35, 0, 0.65, 360 - inner, inner, 16)])]


def _heart() -> list[np.ndarray]:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    points -= (points.max(0) + points.min(0)) / 2
    return [points * 0.85 / np.abs(points).max()]


def _star(points: int, outer: float, inner: float) -> list[np.ndarray]:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]


def _plus(arm: float, reach: float) -> list[np.ndarray]:
    """A cross of two bars ``2 arm`` thick reaching ``reach`` from the centre, as one contour."""
    quarter = [(-arm, -reach), (arm, -reach), (arm, -arm)]  # the top bar's end and the corner after it
    points = []
    for k in range(4):
        c, s = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
        points.extend((c * x - s * y, s * x + c * y) for x, y in quarter)
    return [np.asarray(points, dtype=np.float64)]


def _polygon(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


# The classes: closed contours in unit coordinates (x right, y down, within [-0.85, 0.85]), even-odd filled.
SILHOUETTES: dict[str, list[np.ndarray]] = {
    "triangle": [_polygon((0, -0.82), (0.8, 0.62), (-0.8, 0.62))],
    "diamond": [_polygon((0, -0.85), (0.55, 0), (0, 0.85), (-0.55, 0))],
    "star": _star(5, 0.85, 0.36),
    "plus": _plus(0.22, 0.85),
    "crescent": _crescent(),
    "heart": _heart(),
    "arrow": [_polygon((0, -0.85), (0.7, -0.1), (0.2, -0.1), (0.2, 0.85), (-0.2, 0.85), (-0.2, -0.1), (-0.7, -0.1))],
    "ell": [_polygon((-0.6, -0.85), (-0.15, -0.85), (-0.15, 0.4), (0.7, 0.4), (0.7, 0.85), (-0.6, 0.85))],
    "annulus": [_arc(0, 0, 0.8, 0, 360, 33)[:-1], _arc(0, 0, 0.42, 0, 360, 21)[:-1]],
    "bowtie": [_polygon((-0.8, -0.7), (-0.05, 0), (-0.8, 0.7)), _polygon((0.8, -0.7), (0.05, 0), (0.8, 0.7))],
}
CLASS_NAMES: tuple[str, ...] = tuple(SILHOUETTES)


def fill_coverage(contours: Sequence[np.ndarray]) -> Coverage:
    """The coverage of ``contours`` (closed polygons in unit coordinates) filled by the even-odd rule,
    antialiased from each pixel's signed distance to the outline: continuous in the centre."""
    a = np.concatenate(list(contours))
    b = np.concatenate([np.roll(c, -1, axis=0) for c in contours])
    extent = float(np.abs(a).max()) * math.sqrt(2)

    def draw(shape: tuple[int, int], centre: tuple[float, float], unit: float, angle: float) -> np.ndarray:
        out = np.zeros(shape, dtype=np.float32)
        box = _window(shape, centre, extent * unit + 2)
        if box is None:
            return out
        x0, y0, x1, y1 = box
        p = unit_coordinates((y1 - y0, x1 - x0), (centre[0] - x0, centre[1] - y0), unit, angle)
        distance = distance_to_segments(p, a, b) * unit
        px, py = p[:, None, 0], p[:, None, 1]
        straddles = (a[:, 1] > py) != (b[:, 1] > py)
        dy = np.where(straddles, b[:, 1] - a[:, 1], 1.0)
        crossing = straddles & (px < a[:, 0] + (py - a[:, 1]) * (b[:, 0] - a[:, 0]) / dy)
        inside = crossing.sum(axis=1) % 2 == 1
        signed = np.where(inside, distance, -distance)
        out[y0:y1, x0:x1] = np.clip(signed + 0.5, 0.0, 1.0).reshape(y1 - y0, x1 - x0)
        return out

    return draw


def random_polygon(rng: np.random.Generator) -> list[np.ndarray]:
    """A random star-shaped polygon of 5 to 7 vertices within the unit square: clutter, no class."""
    n = int(rng.integers(5, 8))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = rng.uniform(0.35, 0.85, n)
    return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]


def square_coverage(shape: tuple[int, int], centre: tuple[float, float], half: float) -> np.ndarray:
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) + 0.5
    cover_x = np.clip(half - np.abs(xs - centre[0]) + 0.5, 0.0, 1.0)
    cover_y = np.clip(half - np.abs(ys - centre[1]) + 0.5, 0.0, 1.0)
    return (cover_x * cover_y).astype(np.float32)


def noise_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Three fields of 1/f^b noise mixed by a random colour matrix, scaled into a random sub-range of
    :data:`_BACKGROUND_RANGE` (H, W, 3)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radial = np.maximum(np.hypot(fx, fy), 1.0 / size)
    fields = []
    for _ in range(3):
        spectrum = np.fft.rfft2(rng.normal(size=(size, size))) / radial ** rng.uniform(*_BACKGROUND_EXPONENT)
        field = np.fft.irfft2(spectrum, s=(size, size))
        fields.append((field - field.mean()) / max(field.std(), 1e-9))
    mixed = np.stack(fields, axis=-1) @ rng.uniform(-1.0, 1.0, size=(3, 3))
    lo, hi = mixed.min(), mixed.max()
    low, high = np.sort(rng.uniform(*_BACKGROUND_RANGE, size=2))
    high = max(high, low + 0.2)
    return (low + (mixed - lo) / max(hi - lo, 1e-9) * (high - low)).astype(np.float32)


def _ellipse(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A translucent coloured ellipse anywhere: its opacity (H, W, 1) and colour (3,)."""
    cx, cy = rng.uniform(0, size, size=2)
    rx, ry = rng.uniform(*_BLOB_SIDE, size=2) * size / 2
    angle = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * (xs - cx) + s * (ys - cy)) / rx, (-s * (xs - cx) + c * (ys - cy)) / ry
    edge = (1.0 - np.hypot(u, v)) * min(rx, ry)  # roughly px inside the rim
    alpha = np.clip(edge + 0.5, 0.0, 1.0) * rng.uniform(*_BLOB_OPACITY)
    return alpha[..., None].astype(np.float32), rng.uniform(0.05, 0.9, size=3).astype(np.float32)


def render_shapes2(rng: np.random.Generator, size: int) -> FineRender:
    """Render one ``shapes2``-preset image of ``size`` px from its random stream ``rng``."""
    canvas = noise_background(rng, size)
    stratum = "coarse" if rng.uniform() < COARSE_SHARE else "fine"
    side = rng.uniform(*(COARSE_SIDE if stratum == "coarse" else FINE_SIDE)) * size
    cx, cy = (float(v) for v in rng.uniform(side / 2, size - side / 2, size=2))
    label = int(rng.integers(len(CLASS_NAMES)))
    unit = rng.uniform(*GLYPH_SCALE) * side

    for _ in range(int(rng.integers(_BLOBS[0], _BLOBS[1] + 1))):
        alpha, colour = _ellipse(rng, size)
        canvas = canvas * (1 - alpha) + alpha * colour
    avoid = [(cx, cy, side * math.sqrt(2))]
    for _ in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))):
        d = rng.uniform(*FINE_SIDE) * size
        centre = place(rng, size, 0.7 * d, avoid)
        layer = fine_layer(fill_coverage(random_polygon(rng)), size, centre, rng.uniform(*GLYPH_SCALE) * d,
                           rng.uniform(0, 2 * math.pi))  # fmt: skip
        canvas += (rng.uniform(*FINE_AMPLITUDE) * layer)[..., None]
    canvas = np.clip(canvas, 0.0, 1.0)

    if rng.uniform() < DECOY_PROBABILITY:
        d = rng.uniform(*FINE_SIDE) * size
        centre = place(rng, size, d * math.sqrt(2), avoid)
        plate = square_coverage((size, size), centre, d / 2)[..., None]
        canvas = canvas * (1 - plate) + plate * rng.uniform(*PLATE_GREY)
        canvas += draw_glyph(rng, "fine", fill_coverage(random_polygon(rng)), size, centre,
                             rng.uniform(*GLYPH_SCALE) * d)  # fmt: skip

    rim = size * RIM
    outer = square_coverage((size, size), (cx, cy), side / 2)[..., None]
    inner = square_coverage((size, size), (cx, cy), side / 2 - rim)[..., None]
    canvas = canvas * (1 - outer) + (outer - inner) * _frame_colour(rng) + inner * rng.uniform(*PLATE_GREY)
    glyph = draw_glyph(rng, stratum, fill_coverage(SILHOUETTES[CLASS_NAMES[label]]), size, (cx, cy), unit)
    canvas = canvas + glyph
    canvas += rng.normal(0.0, NOISE_STD, size=canvas.shape).astype(np.float32)
    return FineRender(pixels=np.clip(canvas, 0.0, 1.0).astype(np.float32), label=label,
                      box=pixel_box(cx, cy, side, size), stratum=stratum, glyph_layer=glyph)  # fmt: skip
