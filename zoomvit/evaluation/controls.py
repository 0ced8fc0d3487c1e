"""Zoom controls: ZoomViT's own weights and token counts, other cells (or other pixels) zoomed.

A control ranks the cells its own way; :func:`matched_scores` then hands out ZoomViT's own score
values in that order, so that with ZoomViT's alpha and keep_rate every image zooms exactly as many
cells, and keeps exactly as many tokens, as ZoomViT itself did (coarse merges, when ``coarse_alpha``
is set, follow the control's map). ``upsample`` keeps ZoomViT's cells and re-reads them from the
low-resolution image repeated 2x2 instead of the 2x copy: what real pixels add.
"""

from __future__ import annotations

import torch

CONTROLS: tuple[str, ...] = ("random", "centre", "teacher", "box", "upsample")
# Controls that know what ZoomViT cannot: relevance computed against the true label, the generator's box.
ORACLES: dict[str, str] = {"teacher": "zoomvit_oracle_label", "box": "zoomvit_oracle_box"}


def control_row(kind: str) -> str:
    """A control's row name in evaluation.json: ``zoomvit_oracle_*`` for the oracles, else ``zoomvit_control_*``."""
    return ORACLES.get(kind, f"zoomvit_control_{kind}")


def row_label(model: str) -> str:
    """A row's name in figures and tables, oracles named as such."""
    return {
        "zoomvit_oracle_label": "oracle: relevance vs. true label",
        "zoomvit_oracle_box": "oracle: object box",
    }.get(model, model.replace("zoomvit_control_", "control: "))


def _centre_first(gh: int, gw: int) -> torch.Tensor:
    r = torch.arange(gh, dtype=torch.float32)[:, None] - (gh - 1) / 2
    c = torch.arange(gw, dtype=torch.float32)[None, :] - (gw - 1) / 2
    return -(r**2 + c**2)


def box_cover(box_B4: torch.Tensor, grid: tuple[int, int], image_size: int) -> torch.Tensor:
    """The share of each cell covered by the image's object box (pixels of the model input), with a
    small centre-first term that orders cells the box covers equally."""
    gh, gw = grid
    cell_h, cell_w = image_size / gh, image_size / gw
    y0 = torch.arange(gh, dtype=torch.float32) * cell_h
    x0 = torch.arange(gw, dtype=torch.float32) * cell_w
    b = torch.nan_to_num(box_B4.float(), nan=0.0)
    over_y = (torch.minimum(y0[None] + cell_h, b[:, 3:4]) - torch.maximum(y0[None], b[:, 1:2])).clamp(min=0) / cell_h
    over_x = (torch.minimum(x0[None] + cell_w, b[:, 2:3]) - torch.maximum(x0[None], b[:, 0:1])).clamp(min=0) / cell_w
    centre = _centre_first(gh, gw)
    tie = (centre - centre.min()) / (centre.max() - centre.min()).clamp(min=1e-9)
    return over_y[:, :, None] * over_x[:, None, :] + 1e-4 * tie


def control_scores(
    kind: str,
    shape_BHW: tuple[int, int, int],
    *,
    generator: torch.Generator,
    teacher_BHW: torch.Tensor | None = None,
    box_B4: torch.Tensor | None = None,
    image_size: int | None = None,
) -> torch.Tensor:
    """A control's ranking of the cells (higher zooms first): random (seeded), nearest the centre,
    the teacher's relevance (the oracle ZoomViT imitates), or the object's box (where to look)."""
    B, gh, gw = shape_BHW
    if kind == "random":
        return torch.rand(B, gh, gw, generator=generator)
    if kind == "centre":
        return _centre_first(gh, gw).expand(B, gh, gw).clone()
    if kind == "teacher":
        assert teacher_BHW is not None
        return teacher_BHW
    if kind == "box":
        assert box_B4 is not None and image_size is not None
        return box_cover(box_B4, (gh, gw), image_size)
    raise ValueError(f"unknown control {kind!r}; choose one of {CONTROLS}")


def matched_scores(importance_BHW: torch.Tensor, ranking_BHW: torch.Tensor) -> torch.Tensor:
    """ZoomViT's own score values, handed to the cells in the control's order (the highest value to
    the control's first cell): the same thresholds then zoom as many cells, on the control's cells."""
    B = importance_BHW.shape[0]
    values = importance_BHW.reshape(B, -1).sort(dim=1, descending=True).values
    order = ranking_BHW.reshape(B, -1).float().argsort(dim=1, descending=True, stable=True)
    out = torch.empty_like(values)
    out.scatter_(1, order, values)
    return out.reshape(importance_BHW.shape)


def nearest_2x(images_BCHW: torch.Tensor) -> torch.Tensor:
    """The image with every pixel repeated 2x2: what the ``upsample`` zoom reads."""
    return images_BCHW.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
