"""The zoom tokenizer: which pixels each token sees, at which zoom level, in which order.

Every image is first described on the backbone's patch grid (gh x gw cells of P x P pixels). A cell
whose importance score passes ``alpha`` is *zoomed*: it becomes four tokens of P/2 x P/2 pixels. A
2 x 2 block of cells that are all below ``coarse_alpha`` becomes one *coarse* token of 2P x 2P
pixels. Every other cell is one P x P token. All three kinds are embedded with the same P x P patch
projection. A zoomed sub-cell's P x P pixels come from one of:

- ``upsample`` + ``nearest`` (the default, as the official ZoomViT code: the image with every pixel
  repeated 2x2), so the projection sees exactly the P/2 cell and nothing of its neighbours;
- ``upsample`` + ``bilinear``: a bilinear 2x up-sample (mixes in a half pixel of the neighbours);
- ``highres``: a copy of the image decoded at twice the input resolution, so a zoomed token reads
  real pixels the P x P token never saw (beyond the paper).

Coarse tokens read the 2x down-sampled (2x2 average) image.

What a zoomed cell's fine view does to the cell's own token (``merge``):

- ``replace`` (the paper): the four P/2 tokens take the place of the cell's P x P token;
- ``add``: the cell keeps its P x P token and gains the four P/2 tokens beside it (the global-plus-local
  pattern of high-resolution multimodal models), 4 more tokens per zoomed cell;
- ``fold``: the cell stays one token; its four sub-cell embeddings are concatenated and added to it
  through a zero-initialised projection (APT, arXiv 2510.18091), so the token count never changes.

The number of zoomed cells comes from ``alpha`` (every cell above it), or is fixed per image
(``zoom_cells``: the top-k cells, the same shape for every image; ``token_budget`` says it in tokens).

Tokens of every kind live in one fixed per-image "universe" (coarse blocks and normal cells in raster
order, then zoomed sub-cells cell by cell: the four sub-cells of a cell are adjacent); a layout picks
the valid ones, sorts them by importance (stable, so ties keep the universe order and a cell's four
sub-cells stay together) and pads to the longest image of the batch. Keeping the universe fixed makes
layouts pure index tensors, so planning is batched and independent of the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# Zoom levels carried by every token (and indexing the zoom-level embedding as ``level + 1``).
COARSE, NORMAL, ZOOM = -1, 0, 1
NUM_LEVELS = 3

ZoomSource = Literal["upsample", "highres"]
ZoomResample = Literal["nearest", "bilinear"]
ZoomMerge = Literal["replace", "add", "fold"]
ZOOM_SOURCES: tuple[str, ...] = ("upsample", "highres")
ZOOM_RESAMPLES: tuple[str, ...] = ("nearest", "bilinear")
ZOOM_MERGES: tuple[str, ...] = ("replace", "add", "fold")
TOKENS_PER_ZOOMED_CELL = {"replace": 3, "add": 4, "fold": 0}


@dataclass(frozen=True, kw_only=True)
class ZoomConfig:
    """How an importance map turns into tokens.

    alpha: cells with score > alpha are zoomed (4 tokens of P/2 px); a float, or a (B,) tensor of
        per-image thresholds (training draws one per image).
    coarse_alpha: 2x2 blocks whose four scores are all < coarse_alpha become one 2P token
        (None: no coarse tokens). Must not exceed alpha.
    keep_rate: after ordering by importance keep ceil(keep_rate * n) tokens per image (pruning).
    zoom_cells: if set, zoom exactly the top-k cells of every image (alpha and coarse_alpha are
        ignored): an int (static shapes, no padding) or a (B,) tensor of per-image counts. Ties go to
        the lower cell index.
    token_budget: the same, said as each image's token count (cells + k * tokens per zoomed cell
        of ``merge``; not for ``fold``, whose count never changes).
    merge: what a zoomed cell's fine tokens do to its own token: ``replace``, ``add`` or ``fold``.
    """

    alpha: float | torch.Tensor = 0.5
    coarse_alpha: float | None = None
    keep_rate: float = 1.0
    token_budget: int | torch.Tensor | None = None
    zoom_cells: int | torch.Tensor | None = None
    merge: ZoomMerge = "replace"

    def __post_init__(self) -> None:
        if self.merge not in ZOOM_MERGES:
            raise ValueError(f"merge must be one of {ZOOM_MERGES}, got {self.merge!r}")
        if self.coarse_alpha is not None and self.coarse_alpha > float(torch.as_tensor(self.alpha).min()):
            raise ValueError(f"coarse_alpha ({self.coarse_alpha}) must not exceed alpha ({self.alpha})")
        if self.coarse_alpha is not None and self.merge != "replace":
            raise ValueError(f"coarse tokens combine only with merge='replace', got merge={self.merge!r}")
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {self.keep_rate}")
        if self.keep_rate < 1.0 and self.merge == "fold":
            raise ValueError("keep_rate prunes tokens by their importance; merge='fold' keeps one token per cell")
        if self.token_budget is not None and self.zoom_cells is not None:
            raise ValueError("set one of token_budget and zoom_cells")
        if self.token_budget is not None and self.merge == "fold":
            raise ValueError("merge='fold' keeps one token per cell: fix the zoomed cells with zoom_cells instead")
        if self.token_budget is not None and int(torch.as_tensor(self.token_budget).min()) <= 0:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")
        if self.zoom_cells is not None and int(torch.as_tensor(self.zoom_cells).min()) < 0:
            raise ValueError(f"zoom_cells must be >= 0, got {self.zoom_cells}")

    @property
    def fixed_count(self) -> bool:
        """Whether every image zooms a set number of cells (top-k) rather than those above alpha."""
        return self.token_budget is not None or self.zoom_cells is not None


@dataclass(frozen=True)
class TokenLayout:
    """Per image of a batch, the chosen tokens as indices into the universe, padded to length L.

    index_BL: universe index of each token (0 where padded).
    valid_BL: False for padding.
    level_BL: COARSE / NORMAL / ZOOM (0 where padded).
    box_BL4: pixel box (x0, y0, x1, y1) of each token in the input image (0 where padded).
    importance_BL: the score the token was ordered by (0 where padded).
    zoomed_cells_B: how many cells of each image are zoomed.
    """

    index_BL: torch.Tensor
    valid_BL: torch.Tensor
    level_BL: torch.Tensor
    box_BL4: torch.Tensor
    importance_BL: torch.Tensor
    zoomed_cells_B: torch.Tensor

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

    def add(level: int, r: torch.Tensor, c: torch.Tensor, side: int) -> None:
        boxes.append(torch.stack([c * side, r * side, (c + 1) * side, (r + 1) * side], dim=1))
        levels.append(torch.full((len(r),), level, device=device))

    def raster(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(rows, device=device).repeat_interleave(cols), torch.arange(cols, device=device).repeat(rows)

    if coarse:
        add(COARSE, *raster(gh // 2, gw // 2), 2 * patch_size)
    add(NORMAL, *raster(gh, gw), patch_size)
    r, c = raster(gh, gw)
    sub_r, sub_c = torch.tensor([0, 0, 1, 1], device=device), torch.tensor([0, 1, 0, 1], device=device)
    add(ZOOM, (2 * r[:, None] + sub_r).flatten(), (2 * c[:, None] + sub_c).flatten(), patch_size // 2)
    return TokenUniverse(
        grid=grid, patch_size=patch_size, level_U=torch.cat(levels), box_U4=torch.cat(boxes), coarse=coarse
    )


def cell_levels(scores_BHW: torch.Tensor, config: ZoomConfig) -> torch.Tensor:
    """The zoom level of every grid cell (COARSE cells come in aligned 2x2 blocks)."""
    B, gh, gw = scores_BHW.shape
    levels = torch.zeros_like(scores_BHW, dtype=torch.long)
    if config.fixed_count:
        if config.zoom_cells is not None:
            k_B = torch.as_tensor(config.zoom_cells, device=scores_BHW.device).expand(B)
            if int(k_B.max()) > gh * gw:
                raise ValueError(f"zoom_cells {int(k_B.max())} exceeds the grid's {gh * gw} cells")
        else:
            budget_B = torch.as_tensor(config.token_budget, device=scores_BHW.device).expand(B)
            k_B = torch.tensor(
                [budget_zoom_cells(int(b), gh * gw, config.merge) for b in budget_B.tolist()], device=scores_BHW.device
            )
        order = torch.sort(scores_BHW.flatten(1), dim=1, descending=True, stable=True).indices
        rank_BN = torch.empty_like(order).scatter_(1, order, torch.arange(gh * gw, device=order.device).expand(B, -1))
        levels.view(B, -1)[rank_BN < k_B[:, None]] = ZOOM
        return levels
    alpha_B11 = torch.as_tensor(config.alpha, dtype=scores_BHW.dtype, device=scores_BHW.device).reshape(-1, 1, 1)
    levels[scores_BHW > alpha_B11] = ZOOM
    if config.coarse_alpha is not None:
        low = (scores_BHW < config.coarse_alpha).float()
        block_low = F.max_pool2d(-low.unsqueeze(1), 2).neg().squeeze(1) > 0  # all four cells low
        coarse = block_low.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        levels[coarse] = COARSE
    return levels


def budget_zoom_cells(token_budget: int, num_cells: int, merge: ZoomMerge = "replace") -> int:
    per_cell = TOKENS_PER_ZOOMED_CELL[merge]
    if per_cell == 0:
        raise ValueError("merge='fold' keeps one token per cell: a token budget cannot set its zoomed cells")
    extra = token_budget - num_cells
    if extra < 0 or extra % per_cell or extra // per_cell > num_cells:
        raise ValueError(
            f"token_budget {token_budget} is not reachable on a grid of {num_cells} cells: it must be "
            f"{num_cells} + {per_cell}k for 0 <= k <= {num_cells} (each zoomed cell adds {per_cell} tokens "
            f"with merge={merge!r})"
        )
    return extra // per_cell


def plan_layout(scores_BHW: torch.Tensor, universe: TokenUniverse, config: ZoomConfig) -> TokenLayout:
    """Choose, order and pad the tokens of every image from its cell scores."""
    B, gh, gw = scores_BHW.shape
    if (gh, gw) != universe.grid:
        raise ValueError(f"score maps of grid {gh}x{gw} do not match the model's patch grid {universe.grid}")
    if config.coarse_alpha is not None and not config.fixed_count and not universe.coarse:
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
    zoomed = flat_levels == ZOOM
    parts_valid.append(flat_levels == NORMAL if config.merge == "replace" else flat_levels != COARSE)
    parts_score.append(flat_scores)
    parts_valid.append((zoomed if config.merge != "fold" else torch.zeros_like(zoomed)).repeat_interleave(4, dim=1))
    parts_score.append(flat_scores.repeat_interleave(4, dim=1))
    valid_BU = torch.cat(parts_valid, dim=1)
    score_BU = torch.cat(parts_score, dim=1)
    level_BU = universe.level_U.to(valid_BU.device).expand(B, -1)
    if config.merge == "fold":  # a folded cell's one token carries the zoom level
        first = level_BU.shape[1] - 5 * gh * gw
        level_BU = level_BU.clone()
        level_BU[:, first : first + gh * gw] = torch.where(zoomed, ZOOM, NORMAL)

    key_BU = torch.where(valid_BU, score_BU, torch.full_like(score_BU, -math.inf))
    order_BU = torch.sort(key_BU, dim=1, descending=True, stable=True).indices
    n_valid_B = valid_BU.sum(dim=1)
    if config.keep_rate < 1.0:
        n_valid_B = torch.ceil(n_valid_B.float() * config.keep_rate).long().clamp(min=1)
    L = int(n_valid_B.max())
    index_BL = order_BU[:, :L]
    valid_BL = torch.arange(L, device=index_BL.device).unsqueeze(0) < n_valid_B.unsqueeze(1)
    index_BL = torch.where(valid_BL, index_BL, torch.zeros_like(index_BL))
    level_BL = torch.where(valid_BL, level_BU.gather(1, index_BL), 0)
    box_BL4 = universe.box_U4.to(index_BL.device)[index_BL] * valid_BL.unsqueeze(-1)
    importance_BL = torch.where(valid_BL, score_BU.gather(1, index_BL), 0.0)
    return TokenLayout(
        index_BL=index_BL,
        valid_BL=valid_BL,
        level_BL=level_BL,
        box_BL4=box_BL4,
        importance_BL=importance_BL,
        zoomed_cells_B=zoomed.sum(dim=1),
    )


def detail_energy(highres_BCHW: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per cell of the patch grid, the RMS of what the 2x copy holds beyond its own 2x2 average (the
    top octave, which a view at half its resolution cannot hold), in the images' own units: (B, gh, gw)."""
    base = F.avg_pool2d(highres_BCHW, 2).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    residual = (highres_BCHW - base).pow(2).mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(residual, grid).squeeze(1).sqrt()


def zoom_pixels(
    images_BCHW: torch.Tensor,
    *,
    source: ZoomSource = "upsample",
    resample: ZoomResample = "nearest",
    highres_BCHW: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (B, C, 2H, 2W) image zoomed sub-cells are cut from (see the module docstring)."""
    B, C, H, W = images_BCHW.shape
    if source == "highres":
        if highres_BCHW is None:
            raise ValueError("zoom_source='highres' needs the 2x resolution copy of the images (highres=...)")
        if tuple(highres_BCHW.shape) != (B, C, 2 * H, 2 * W):
            raise ValueError(f"the highres images must be {(B, C, 2 * H, 2 * W)}, got {tuple(highres_BCHW.shape)}")
        return highres_BCHW.to(images_BCHW.dtype)
    if source != "upsample":
        raise ValueError(f"zoom_source must be one of {ZOOM_SOURCES}, got {source!r}")
    if resample == "nearest":
        return images_BCHW.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if resample == "bilinear":
        return F.interpolate(images_BCHW, scale_factor=2, mode="bilinear", align_corners=False)
    raise ValueError(f"zoom_resample must be one of {ZOOM_RESAMPLES}, got {resample!r}")


def universe_patches(images_BCHW: torch.Tensor, universe: TokenUniverse, zoomed_BCHW: torch.Tensor) -> torch.Tensor:
    """Pixels of every candidate token, flattened like a P x P conv kernel: (B, U, C*P*P).
    ``zoomed_BCHW``: the 2x image zoomed sub-cells are cut from (:func:`zoom_pixels`)."""
    P = universe.patch_size
    parts = []
    if universe.coarse:
        parts.append(_patchify(F.avg_pool2d(images_BCHW, 2), P))
    parts.append(_patchify(images_BCHW, P))
    parts.append(_cell_major(_patchify(zoomed_BCHW, P), universe.grid))
    return torch.cat(parts, dim=1)


def _patchify(x_BCHW: torch.Tensor, P: int) -> torch.Tensor:
    B, C, H, W = x_BCHW.shape
    gh, gw = H // P, W // P
    x = x_BCHW[:, :, : gh * P, : gw * P].reshape(B, C, gh, P, gw, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * P * P)


def _cell_major(fine_BNK: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Rows of a (2gh x 2gw) raster reordered cell by cell (the universe's zoom order)."""
    gh, gw = grid
    B, _, K = fine_BNK.shape
    return fine_BNK.reshape(B, gh, 2, gw, 2, K).permute(0, 1, 3, 2, 4, 5).reshape(B, 4 * gh * gw, K)


def universe_pos_embed(pos_grid_1DHW: torch.Tensor, universe: TokenUniverse) -> torch.Tensor:
    """Position embedding of every candidate token, evaluated at the token's true centre: (U, D).

    The patch-grid embedding is treated as a function sampled at the cell centres and evaluated
    bilinearly at the centres of the finer (zoom) and coarser grids; the outer half-cell ring of the
    zoom grid lies beyond the outermost centres and is extrapolated linearly from the two nearest.
    """
    gh, gw = universe.grid
    parts = []
    if universe.coarse:
        parts.append(_sample_linear(pos_grid_1DHW, gh // 2, gw // 2))
    parts.append(pos_grid_1DHW)
    fine = _sample_linear(pos_grid_1DHW, 2 * gh, 2 * gw).flatten(2).transpose(1, 2)
    parts.append(_cell_major(fine, universe.grid).transpose(1, 2))
    return torch.cat([p.flatten(2).squeeze(0).transpose(0, 1) for p in parts], dim=0)


def _sample_linear(grid_1DHW: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Separable linear interpolation (extrapolation at the border) from cell centres of an H x W
    grid to cell centres of an out_h x out_w grid covering the same square."""

    def weights(n_in: int, n_out: int) -> torch.Tensor:  # (n_out, n_in)
        W = torch.zeros(n_out, n_in, dtype=grid_1DHW.dtype, device=grid_1DHW.device)
        if n_in == 1:
            return W + 1
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5
        i0 = src.floor().clamp(0, n_in - 2).long()
        t = (src - i0).to(W.dtype)
        rows = torch.arange(n_out)
        W[rows, i0] = 1 - t
        W[rows, i0 + 1] = t
        return W

    _, _, H, Wd = grid_1DHW.shape
    return torch.einsum("oh,dhw,pw->dop", weights(H, out_h), grid_1DHW[0], weights(Wd, out_w)).unsqueeze(0)
