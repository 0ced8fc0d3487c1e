"""Fitting a decoded image to the model's square input: the resize / crop geometry and the RGB conversion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 40_000_000  # decoded RGB ~120 MB; ImageNet's largest image has ~12M pixels
_ALPHA_BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}


@dataclass(frozen=True, kw_only=True)
class ImageTransform:
    """Resize to a square ``image_size`` input.

    ``center_crop`` resizes the shorter side to ``int(image_size / crop_pct)`` and crops the centre
    (``crop_pct=1.0`` crops nothing from the shorter side); ``resize`` stretches to the square.
    Images whose shorter side is below ``min_size`` are skipped as tiny, images with more than
    ``max_pixels`` pixels as oversized (checked from the header, before decoding). Transparent pixels are
    composited on ``alpha_background`` (black by default). ``highres``: also decode the same crop at
    twice the size (for ZoomViT's ``zoom_source: highres``).
    """

    image_size: int
    resize_mode: Literal["center_crop", "resize"] = "center_crop"
    crop_pct: float = 1.0
    min_size: int = 8
    max_pixels: int = MAX_IMAGE_PIXELS
    alpha_background: Literal["black", "white"] = "black"
    highres: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.resize_mode not in ("center_crop", "resize"):
            raise ValueError(f"resize_mode must be 'center_crop' or 'resize', got {self.resize_mode!r}")
        if not (isinstance(self.crop_pct, (int, float)) and 0.0 < self.crop_pct <= 1.0):
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 1:
            raise ValueError(f"min_size must be a positive int, got {self.min_size!r}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if self.alpha_background not in _ALPHA_BACKGROUNDS:
            raise ValueError(f"alpha_background must be 'black' or 'white', got {self.alpha_background!r}")

    def geometry(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(resized_width, resized_height, crop_left, crop_top)`` for a ``width`` x ``height`` image."""
        size = self.image_size
        if self.resize_mode == "resize":
            return size, size, 0, 0
        short = max(size, int(size / self.crop_pct))
        if width <= height:
            rw, rh = short, max(size, round(height * short / width))
        else:
            rw, rh = max(size, round(width * short / height)), short
        return rw, rh, int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))

    def map_box(
        self, box: tuple[float, float, float, float], width: int, height: int
    ) -> tuple[float, float, float, float] | None:
        """Map a box in source pixels into output pixels, clipped; None when nothing of it remains."""
        rw, rh, left, top = self.geometry(width, height)
        sx, sy = rw / width, rh / height
        x0, y0, x1, y1 = box
        size = float(self.image_size)
        mapped = (
            min(max(x0 * sx - left, 0.0), size),
            min(max(y0 * sy - top, 0.0), size),
            min(max(x1 * sx - left, 0.0), size),
            min(max(y1 * sy - top, 0.0), size),
        )
        if mapped[2] <= mapped[0] or mapped[3] <= mapped[1]:
            return None
        return mapped

    def apply(self, img: Image.Image, *, scale: int = 1) -> np.ndarray:
        """Resize and crop an image (opened, not necessarily loaded) to uint8 ``(S, S, 3)``; with
        ``scale=2`` the same crop at twice the resolution, ``(2S, 2S, 3)``, pixel-aligned with it."""
        width, height = img.size
        rw, rh, left, top = (v * scale for v in self.geometry(width, height))
        size = self.image_size * scale
        source_box: tuple[float, float, float, float] | None = None
        if img.format in ("JPEG", "MPO") and min(width // rw, height // rh) >= 2:
            drafted = img.draft(None, (rw, rh))
            if drafted is not None:
                source_box = drafted[1]
        rgb = to_rgb(img, background=_ALPHA_BACKGROUNDS[self.alpha_background])
        if rgb.size != (rw, rh):
            rgb = rgb.resize((rw, rh), Image.Resampling.BICUBIC, box=source_box)
        if (rw, rh) != (size, size):
            rgb = rgb.crop((left, top, left + size, top + size))
        return np.asarray(rgb, dtype=np.uint8).copy()


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Convert any PIL mode to RGB: grayscale is replicated, 16-bit and float grayscale rescaled to
    0..255, palette and CMYK converted, alpha composited on ``background``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        img = Image.fromarray(_gray_to_uint8(np.asarray(img)))
    if img.mode == "RGBA":
        base = Image.new("RGB", img.size, background)
        base.paste(img, mask=img.getchannel("A"))
        return base
    return img.convert("RGB")


def _gray_to_uint8(values: np.ndarray) -> np.ndarray:
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    peak = float(np.nanmax(values)) if values.size else 0.0
    if is_float and peak <= 1.0 and float(np.nanmin(values)) >= 0.0 and peak > 0.0:
        values = values * 255.0
    elif peak > 255.0:
        values = values / 257.0
    return np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
