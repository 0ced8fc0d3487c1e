"""The zoom tokenizer: which pixels each token sees, at which zoom level, in which order.

Every image is first described on the backbone's patch grid (gh x gw cells of P x P pixels). A cell
whose importance score passes ``alpha`` is *zoomed*: it becomes four tokens of P/2 x P/2 pixels. A
2 x 2 block of cells that are all below ``coarse_alpha`` becomes one *coarse* token of 2P x 2P
pixels. Every other cell is one P x P token. All three kinds are embedded with the same P x P patch
projection, applied to the 2x up-sampled image (zoom), the image itself, or the 2x down-sampled
image (coarse), as the official ZoomViT does for the zoomed level.

Tokens of every kind live in one fixed per-image "universe" (coarse cells, then normal cells, then
zoomed sub-cells, each in raster order); a layout picks the valid ones, sorts them by importance and
pads to the longest image of the batch. Keeping the universe fixed makes layouts pure index tensors,
so planning is batched and independent of the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Zoom levels carried by every token (and indexing the zoom-level embedding as ``level + 1``).
COARSE, NORMAL, ZOOM = -1, 0, 1
NUM_LEVELS = 3


@dataclass(frozen=True, kw_only=True)
class ZoomConfig:
    """How an importance map turns into tokens.

    alpha: cells with score > alpha are zoomed (4 tokens of P/2 px).
    coarse_alpha: 2x2 blocks whose four scores are all < coarse_alpha become one 2P token
        (None: no coarse tokens). Must not exceed alpha.
    keep_rate: after ordering by importance keep ceil(keep_rate * n) tokens per image (pruning).
    token_budget: if set, zoom exactly the top-k cells of every image so that each image has
        ``token_budget`` tokens (static shapes, no padding); alpha and coarse_alpha are ignored.
    """

    alpha: float = 0.5
    coarse_alpha: float | None = None
    keep_rate: float = 1.0
    token_budget: int | None = None

    def __post_init__(self) -> None:
        if self.coarse_alpha is not None and self.coarse_alpha > self.alpha:
            raise ValueError(f"coarse_alpha ({self.coarse_alpha}) must not exceed alpha ({self.alpha})")
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {self.keep_rate}")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")


@dataclass(frozen=True)
class TokenLayout:
    """Per image of a batch, the chosen tokens as indices into the universe, padded to length L.

    index_BL: universe index of each token (0 where padded).
    valid_BL: False for padding.
    level_BL: COARSE / NORMAL / ZOOM (0 where padded).
    box_BL4: pixel box (x0, y0, x1, y1) of each token in the input image (0 where padded).
    importance_BL: the score the token was ordered by (0 where padded).
    """

    index_BL: torch.Tensor
    valid_BL: torch.Tensor
    level_BL: torch.Tensor
    box_BL4: torch.Tensor
    importance_BL: torch.Tensor

    @property
    def num_tokens_B(self) -> torch.Tensor:
        return self.valid_BL.sum(dim=1)


@dataclass(frozen=True)
class TokenUniverse:
    """Static description of every candidate token for one input size and patch size."""

    grid: tuple[int, int]
    patch_size: int
    level_U: torch.Tensor
    box_U4: torch.Tensor
    coarse: bool


def build_universe(grid: tuple[int, int], patch_size: int, *, coarse: bool, device=None) -> TokenUniverse:
    gh, gw = grid
    if patch_size % 2:
        raise ValueError(f"zooming needs an even patch size, got {patch_size}")
    if coarse and (gh % 2 or gw % 2):
        raise ValueError(f"coarse tokens need an even patch grid, got {gh}x{gw}")
    levels, boxes = [], []

    def add(level: int, rows: int, cols: int, side: int) -> None:
        r = torch.arange(rows, device=device).repeat_interleave(cols)
        c = torch.arange(cols, device=device).repeat(rows)
        boxes.append(torch.stack([c * side, r * side, (c + 1) * side, (r + 1) * side], dim=1))
        levels.append(torch.full((rows * cols,), level, device=device))

    if coarse:
        add(COARSE, gh // 2, gw // 2, 2 * patch_size)
    add(NORMAL, gh, gw, patch_size)
    add(ZOOM, 2 * gh, 2 * gw, patch_size // 2)
    return TokenUniverse(
        grid=grid, patch_size=patch_size, level_U=torch.cat(levels), box_U4=torch.cat(boxes), coarse=coarse
    )


def cell_levels(scores_BHW: torch.Tensor, config: ZoomConfig) -> torch.Tensor:
    """The zoom level of every grid cell (COARSE cells come in aligned 2x2 blocks)."""
    B, gh, gw = scores_BHW.shape
    levels = torch.zeros_like(scores_BHW, dtype=torch.long)
    if config.token_budget is not None:
        k = budget_zoom_cells(config.token_budget, gh * gw)
        if k:
            top = scores_BHW.flatten(1).topk(k, dim=1).indices
            levels.view(B, -1).scatter_(1, top, ZOOM)
        return levels
    levels[scores_BHW > config.alpha] = ZOOM
    if config.coarse_alpha is not None:
        low = (scores_BHW < config.coarse_alpha).float()
        block_low = F.max_pool2d(-low.unsqueeze(1), 2).neg().squeeze(1) > 0  # all four cells low
        coarse = block_low.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        levels[coarse] = COARSE
    return levels


def budget_zoom_cells(token_budget: int, num_cells: int) -> int:
    extra = token_budget - num_cells
    if extra < 0 or extra % 3 or extra // 3 > num_cells:
        raise ValueError(
            f"token_budget {token_budget} is not reachable on a grid of {num_cells} cells: it must be "
            f"{num_cells} + 3k for 0 <= k <= {num_cells} (each zoomed cell adds 3 tokens)"
        )
    return extra // 3


def plan_layout(scores_BHW: torch.Tensor, universe: TokenUniverse, config: ZoomConfig) -> TokenLayout:
    """Choose, order and pad the tokens of every image from its cell scores."""
    B, gh, gw = scores_BHW.shape
    if (gh, gw) != universe.grid:
        raise ValueError(f"score maps of grid {gh}x{gw} do not match the model's patch grid {universe.grid}")
    if config.coarse_alpha is not None and config.token_budget is None and not universe.coarse:
        raise ValueError("coarse_alpha is set but the model was built without coarse tokens (coarse=False)")
    scores_BHW = scores_BHW.detach().float()
    levels_BHW = cell_levels(scores_BHW, config)
    flat_levels = levels_BHW.flatten(1)
    flat_scores = scores_BHW.flatten(1)

    parts_valid, parts_score = [], []
    if universe.coarse:
        blocks = (gh // 2) * (gw // 2)
        coarse_valid = levels_BHW[:, ::2, ::2].reshape(B, blocks) == COARSE
        coarse_score = F.avg_pool2d(scores_BHW.unsqueeze(1), 2).reshape(B, blocks)
        parts_valid.append(coarse_valid)
        parts_score.append(coarse_score)
    parts_valid.append(flat_levels == NORMAL)
    parts_score.append(flat_scores)
    zoom_cell = (levels_BHW == ZOOM).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    zoom_score = scores_BHW.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    parts_valid.append(zoom_cell.flatten(1))
    parts_score.append(zoom_score.flatten(1))
    valid_BU = torch.cat(parts_valid, dim=1)
    score_BU = torch.cat(parts_score, dim=1)

    key_BU = torch.where(valid_BU, score_BU, torch.full_like(score_BU, -math.inf))
    order_BU = torch.sort(key_BU, dim=1, descending=True, stable=True).indices
    n_valid_B = valid_BU.sum(dim=1)
    if config.keep_rate < 1.0:
        n_valid_B = torch.ceil(n_valid_B.float() * config.keep_rate).long().clamp(min=1)
    L = int(n_valid_B.max())
    index_BL = order_BU[:, :L]
    valid_BL = torch.arange(L, device=index_BL.device).unsqueeze(0) < n_valid_B.unsqueeze(1)
    index_BL = torch.where(valid_BL, index_BL, torch.zeros_like(index_BL))
    level_BL = torch.where(valid_BL, universe.level_U.to(index_BL.device)[index_BL], 0)
    box_BL4 = universe.box_U4.to(index_BL.device)[index_BL] * valid_BL.unsqueeze(-1)
    importance_BL = torch.where(valid_BL, score_BU.gather(1, index_BL), 0.0)
    return TokenLayout(
        index_BL=index_BL,
        valid_BL=valid_BL,
        level_BL=level_BL,
        box_BL4=box_BL4,
        importance_BL=importance_BL,
    )


def universe_patches(images_BCHW: torch.Tensor, universe: TokenUniverse) -> torch.Tensor:
    """Pixels of every candidate token, flattened like a P x P conv kernel: (B, U, C*P*P)."""
    P = universe.patch_size
    parts = []
    if universe.coarse:
        parts.append(_patchify(F.avg_pool2d(images_BCHW, 2), P))
    parts.append(_patchify(images_BCHW, P))
    up = F.interpolate(images_BCHW, scale_factor=2, mode="bilinear", align_corners=False)
    parts.append(_patchify(up, P))
    return torch.cat(parts, dim=1)


def gather_patches(images_BCHW: torch.Tensor, universe: TokenUniverse, layout: TokenLayout) -> torch.Tensor:
    """Pixels of the chosen tokens only: (B, L, C*P*P)."""
    patches_BUK = universe_patches(images_BCHW, universe)
    idx = layout.index_BL.unsqueeze(-1).expand(-1, -1, patches_BUK.shape[-1])
    return patches_BUK.gather(1, idx)


def _patchify(x_BCHW: torch.Tensor, P: int) -> torch.Tensor:
    B, C, H, W = x_BCHW.shape
    gh, gw = H // P, W // P
    x = x_BCHW[:, :, : gh * P, : gw * P].reshape(B, C, gh, P, gw, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * P * P)


def universe_pos_embed(pos_grid_1DHW: torch.Tensor, universe: TokenUniverse) -> torch.Tensor:
    """Position embedding of every candidate token, sampled at the token's true centre: (U, D).

    Bilinear resampling of the patch-grid embedding (align_corners=False) evaluates it exactly at
    the centres of the finer (zoom) and coarser grids.
    """
    gh, gw = universe.grid
    parts = []
    if universe.coarse:
        parts.append(F.interpolate(pos_grid_1DHW, size=(gh // 2, gw // 2), mode="bilinear", align_corners=False))
    parts.append(pos_grid_1DHW)
    parts.append(F.interpolate(pos_grid_1DHW, size=(2 * gh, 2 * gw), mode="bilinear", align_corners=False))
    return torch.cat([p.flatten(2).squeeze(0).transpose(0, 1) for p in parts], dim=0)
