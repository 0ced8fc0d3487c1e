"""ZoomViT: a timm VisionTransformer whose tokenizer zooms into the regions a Zoomer marks.

The backbone is timm's ``VisionTransformer`` (same parameter names, so DeiT/ViT state dicts load
where shapes match); only the tokenizer differs: tokens of three sizes (2P, P, P/2 px), a position
embedding evaluated at each token's true location, a learned zoom-level embedding that starts at
zero (a ZoomViT made from a ViT's weights is that ViT until it trains), tokens ordered by importance,
and images of different token counts run together as one packed sequence of their real tokens,
attention restricted to each image (``sequences="packed"``, :mod:`zoomvit.models.packed`), or padded
to the longest with an attention mask (``"padded"``), so every image of a batch keeps exactly its own
result. ``"auto"`` (the default) packs on CUDA and pads on the CPU, where the jagged attention's math
path measured slower than the padded one (``bench/packed_sequences.py``). The Zoomer always runs in
fp32, whatever precision the backbone is cast to.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from zoomvit.models.packed import pack, packed_block, unpack
from zoomvit.models.tokenizer import (
    NUM_LEVELS,
    ZOOM,
    ZOOM_RESAMPLES,
    ZOOM_SOURCES,
    TokenLayout,
    ZoomConfig,
    ZoomMerge,
    ZoomResample,
    ZoomSource,
    build_universe,
    detail_energy,
    plan_layout,
    universe_patches,
    universe_pos_embed,
    zoom_pixels,
)
from zoomvit.models.zoomer import Zoomer

__all__ = ["ZoomViT", "ZoomTokens", "load_backbone_state_dict"]


@dataclass(frozen=True)
class ZoomTokens:
    """The tokenizer's output for a batch (patch tokens only, without the class token).

    tokens_BLD: embedded tokens (patch projection + position + zoom-level embedding).
    box_BL4: each token's pixel box (x0, y0, x1, y1) in the input image.
    level_BL: zoom level, -1 coarse (2P px), 0 normal (P px), 1 zoomed (P/2 px).
    valid_BL: False where the row is padding.
    importance_BL: the score the token was ordered by.
    zoomed_cells_B: how many cells of each image are zoomed (with the token count, what its cost depends on).
    """

    tokens_BLD: torch.Tensor
    box_BL4: torch.Tensor
    level_BL: torch.Tensor
    valid_BL: torch.Tensor
    importance_BL: torch.Tensor
    zoomed_cells_B: torch.Tensor

    @property
    def num_tokens_B(self) -> torch.Tensor:
        return self.valid_BL.sum(dim=1)


class ZoomViT(VisionTransformer):
    def __init__(
        self,
        *,
        alpha: float = 0.5,
        coarse_alpha: float | None = None,
        coarse: bool = False,
        keep_rate: float = 1.0,
        token_budget: int | None = None,
        zoom_cells: int | None = None,
        zoom_merge: ZoomMerge = "replace",
        detail_gate: float | None = None,
        zoom_source: ZoomSource = "upsample",
        zoom_resample: ZoomResample = "nearest",
        zoomer_width: int = 64,
        zoomer_depth: int = 2,
        zoomer_head: str = "global",
        with_zoomer: bool = True,
        distilled: bool = False,
        sequences: Literal["auto", "packed", "padded"] = "auto",
        **vit_kwargs: Any,
    ) -> None:
        for key, unsupported in (("reg_tokens", 0), ("no_embed_class", False), ("dynamic_img_size", False)):
            if vit_kwargs.get(key, unsupported) != unsupported:
                raise ValueError(f"ZoomViT does not support {key}={vit_kwargs[key]!r}")
        if vit_kwargs.get("class_token", True) is False:
            raise ValueError("ZoomViT needs a class token")
        if vit_kwargs.get("global_pool", "token") not in ("token", "avg"):
            raise ValueError(f"ZoomViT pools with 'token' or 'avg', got global_pool={vit_kwargs['global_pool']!r}")
        if zoom_source not in ZOOM_SOURCES:
            raise ValueError(f"zoom_source must be one of {ZOOM_SOURCES}, got {zoom_source!r}")
        if zoom_resample not in ZOOM_RESAMPLES:
            raise ValueError(f"zoom_resample must be one of {ZOOM_RESAMPLES}, got {zoom_resample!r}")
        if detail_gate is not None and zoom_source != "highres":
            raise ValueError("detail_gate measures what the 2x copy adds: it needs zoom_source='highres'")
        if sequences not in ("auto", "packed", "padded"):
            raise ValueError(f"sequences must be 'auto', 'packed' or 'padded', got {sequences!r}")
        super().__init__(**vit_kwargs)
        self.sequences = sequences
        self.distilled = distilled
        self.distilled_training = False
        if distilled:  # DeiT: a second prefix token with its own position and head
            self.num_prefix_tokens += 1
            self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            pos = self.pos_embed.data
            self.pos_embed = nn.Parameter(torch.cat([pos[:, :1], torch.zeros_like(pos[:, :1]), pos[:, 1:]], dim=1))
            self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
            trunc_normal_(self.dist_token, std=0.02)
            trunc_normal_(self.pos_embed[:, 1:2], std=0.02)
        self.zoom = ZoomConfig(
            alpha=alpha,
            coarse_alpha=coarse_alpha,
            keep_rate=keep_rate,
            token_budget=token_budget,
            zoom_cells=zoom_cells,
            merge=zoom_merge,
        )
        self.coarse = coarse or coarse_alpha is not None
        if self.coarse and zoom_merge != "replace":
            raise ValueError(f"coarse tokens combine only with zoom_merge='replace', got {zoom_merge!r}")
        self.zoom_source, self.zoom_resample = zoom_source, zoom_resample
        self.detail_gate = detail_gate
        self.zoom_embed = nn.Parameter(torch.zeros(NUM_LEVELS, self.embed_dim))
        self.zoom_fold = None
        if zoom_merge == "fold":  # zero-initialised: a folded cell starts as its plain token
            self.zoom_fold = nn.Linear(4 * self.embed_dim, self.embed_dim)
            nn.init.zeros_(self.zoom_fold.weight)
            nn.init.zeros_(self.zoom_fold.bias)
        self.zoomer = (
            Zoomer(grid=self.grid, width=zoomer_width, depth=zoomer_depth, head=zoomer_head) if with_zoomer else None
        )
        self._universe = build_universe(self.grid, self.patch_size, coarse=self.coarse)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        ph, pw = self.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"ZoomViT needs square patches, got {ph}x{pw}")
        return ph

    @property
    def num_cells(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"zoom_embed", "dist_token"}

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(class logits, distillation logits)`` instead of their mean."""
        if enable and not self.distilled:
            raise ValueError("this ZoomViT has no distillation token: create it with distilled=True")
        self.distilled_training = enable

    def zoom_config(self, **overrides: Any) -> ZoomConfig:
        """The model's zoom settings with some fields replaced (alpha=..., token_budget=..., ...)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "zoom_cells" in overrides:  # one way to fix the count: the call's replaces the model's
            overrides.setdefault("token_budget", None)
        elif "token_budget" in overrides:
            overrides.setdefault("zoom_cells", None)
        return replace(self.zoom, **overrides)

    def attach_zoomer(self, zoomer: Zoomer, *, freeze: bool = True) -> ZoomViT:
        if tuple(zoomer.grid) != self.grid:
            raise ValueError(f"Zoomer predicts a {zoomer.grid} grid, the model's patch grid is {self.grid}")
        self.zoomer = zoomer.freeze() if freeze else zoomer
        return self

    def importance(self, images_BCHW: torch.Tensor, highres: torch.Tensor | None = None) -> torch.Tensor:
        """The Zoomer's cell scores; with ``detail_gate``, zero where the 2x copy ``highres`` holds no
        more detail than the base view (:func:`~zoomvit.models.tokenizer.detail_energy` at or below it)."""
        if self.zoomer is None:
            raise ValueError("this ZoomViT has no Zoomer: pass scores=... or attach_zoomer() first")
        scores_BHW = self.zoomer(images_BCHW)
        if self.detail_gate is None:
            return scores_BHW
        if highres is None:
            raise ValueError("detail_gate needs the 2x resolution copy of the images (highres=...)")
        detail_BHW = detail_energy(highres.float(), self.grid)
        return scores_BHW * (detail_BHW > self.detail_gate).to(scores_BHW.dtype)

    def layout(self, scores_BHW: torch.Tensor, config: ZoomConfig | None = None) -> TokenLayout:
        return plan_layout(scores_BHW, self._universe_on(scores_BHW.device), config or self.zoom)

    def tokenize(
        self,
        images_BCHW: torch.Tensor,
        scores_BHW: torch.Tensor | None = None,
        *,
        highres: torch.Tensor | None = None,
        config: ZoomConfig | None = None,
        **zoom: Any,
    ) -> ZoomTokens:
        """Embed an image batch into zoom tokens. ``highres``: the images at twice the resolution
        (read by zoomed tokens when ``zoom_source='highres'``); ``zoom`` overrides zoom config fields."""
        if scores_BHW is None:
            scores_BHW = self.importance(images_BCHW, highres)
        config = config or self.zoom_config(**zoom)
        if config.merge != self.zoom.merge:
            raise ValueError(f"this ZoomViT was built with zoom_merge={self.zoom.merge!r}, not {config.merge!r}")
        universe = self._universe_on(images_BCHW.device)
        layout = plan_layout(scores_BHW, universe, config)
        pe = self.patch_embed
        weight = pe.proj.weight
        images_BCHW = images_BCHW.to(weight.dtype)
        zoomed = zoom_pixels(images_BCHW, source=self.zoom_source, resample=self.zoom_resample, highres_BCHW=highres)
        patches_BUK = universe_patches(images_BCHW, universe, zoomed)
        patches_BLK = patches_BUK.gather(1, layout.index_BL.unsqueeze(-1).expand(-1, -1, patches_BUK.shape[-1]))
        tokens = pe.norm(F.linear(patches_BLK, weight.flatten(1), pe.proj.bias))
        if self.zoom_fold is not None:
            tokens = self._fold(tokens, patches_BUK, layout)
        pos_grid = self.pos_embed[:, self.num_prefix_tokens :].reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        pos_UD = universe_pos_embed(pos_grid, universe)
        tokens = tokens + pos_UD[layout.index_BL] + self.zoom_embed[layout.level_BL + 1]
        tokens = tokens * layout.valid_BL.unsqueeze(-1).to(tokens.dtype)
        return ZoomTokens(
            tokens_BLD=tokens,
            box_BL4=layout.box_BL4,
            level_BL=layout.level_BL,
            valid_BL=layout.valid_BL,
            importance_BL=layout.importance_BL,
            zoomed_cells_B=layout.zoomed_cells_B,
        )

    def _fold(self, tokens_BLD: torch.Tensor, patches_BUK: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Add each zoomed cell's four sub-cell embeddings, concatenated, through ``zoom_fold``; only
        the zoomed cells' sub-cells are embedded."""
        b_M, l_M = (layout.valid_BL & (layout.level_BL == ZOOM)).nonzero(as_tuple=True)
        if len(b_M) == 0:
            return tokens_BLD
        cells = self.num_cells
        first_cell = patches_BUK.shape[1] - 5 * cells  # the universe: [coarse] cells, then 4 sub-cells per cell
        cell_M = layout.index_BL[b_M, l_M] - first_cell
        sub_M4 = first_cell + cells + 4 * cell_M[:, None] + torch.arange(4, device=cell_M.device)
        pe = self.patch_embed
        fine_M4D = pe.norm(F.linear(patches_BUK[b_M[:, None], sub_M4], pe.proj.weight.flatten(1), pe.proj.bias))
        return tokens_BLD.index_put((b_M, l_M), self.zoom_fold(fine_M4D.flatten(1)), accumulate=True)

    def forward_tokens(self, zt: ZoomTokens) -> torch.Tensor:
        """Transformer over zoom tokens; returns the normed sequence with the class token first."""
        B = zt.tokens_BLD.shape[0]
        prefix = [self.cls_token + self.pos_embed[:, :1]]
        if self.distilled:
            prefix.append(self.dist_token + self.pos_embed[:, 1:2])
        x = torch.cat([p.expand(B, -1, -1) for p in prefix] + [zt.tokens_BLD], dim=1)
        x = self.pos_drop(x)
        x = self.norm_pre(x)
        if bool(zt.valid_BL.all()):
            for block in self.blocks:
                x = block(x)
            return self.norm(x)
        keep = torch.cat([zt.valid_BL.new_ones(B, self.num_prefix_tokens), zt.valid_BL], dim=1)
        if self.sequences == "packed" or (self.sequences == "auto" and x.is_cuda):
            x_ND, offsets = pack(x, keep)
            for block in self.blocks:
                x_ND = packed_block(block, x_ND, offsets)
            return self.norm(unpack(x_ND, keep))
        attn_mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        attn_mask = attn_mask.masked_fill(~keep, float("-inf"))[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)

    def forward_head_masked(self, x_BLD: torch.Tensor, valid_BL: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == "avg":
            w = valid_BL.unsqueeze(-1).to(x_BLD.dtype)
            x = (x_BLD[:, self.num_prefix_tokens :] * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            x = x_BLD[:, 0]
        x = self.head_drop(self.fc_norm(x))
        if not self.distilled:
            return x if pre_logits else self.head(x)
        x_dist = self.head_drop(self.fc_norm(x_BLD[:, 1]))
        if pre_logits:
            return (x + x_dist) / 2
        logits, logits_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(
        self,
        images_BCHW: torch.Tensor,
        scores: torch.Tensor | None = None,
        *,
        highres: torch.Tensor | None = None,
        return_tokens: bool = False,
        **zoom: Any,
    ):
        """Logits for an image batch; ``scores`` (B, gh, gw) replaces the attached Zoomer's maps.

        ``highres``: the batch at twice the resolution, for ``zoom_source='highres'``. ``zoom``
        overrides the zoom config for this call (alpha=..., token_budget=..., keep_rate=...; alpha
        and token_budget also take a (B,) tensor of per-image values). With ``return_tokens`` the
        result is ``(logits, ZoomTokens)``.
        """
        zt = self.tokenize(images_BCHW, scores, highres=highres, **zoom)
        logits = self.forward_head_masked(self.forward_tokens(zt), zt.valid_BL)
        return (logits, zt) if return_tokens else logits

    def _universe_on(self, device: torch.device):
        if self._universe.level_U.device != device:
            self._universe = build_universe(self.grid, self.patch_size, coarse=self.coarse, device=device)
        return self._universe


def load_backbone_state_dict(model: ZoomViT, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load a timm ViT/DeiT state dict into a ZoomViT where shapes match.

    The position embedding is resampled (bicubic, prefix tokens kept apart) when the patch grids
    differ; a head of another class count is left at its initialisation. Returns which keys were
    loaded, skipped (no match in the model) and left missing.
    """
    from zoomvit.models.loading import load_pretrained

    return load_pretrained(model, state_dict)


def _filter_backbone(state_dict: dict[str, torch.Tensor], model: ZoomViT) -> dict[str, torch.Tensor]:
    from zoomvit.models.loading import fitting_state_dict

    return fitting_state_dict(state_dict, model)[0]


def _create_zoomvit(variant: str, pretrained: bool = False, **kwargs: Any) -> ZoomViT:
    return build_model_with_cfg(
        ZoomViT,
        variant,
        pretrained,
        pretrained_filter_fn=_filter_backbone,
        pretrained_strict=False,
        **kwargs,
    )


def _cfg(hf_hub_id: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "hf_hub_id": hf_hub_id,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


# Pretrained tags load the DeiT backbone of the same size (the zoom parts start fresh).
default_cfgs = generate_default_cfgs(
    {
        "zoomvit_tiny_patch16_224.deit_in1k": _cfg(hf_hub_id="timm/deit_tiny_patch16_224.fb_in1k"),
        "zoomvit_small_patch16_224.deit_in1k": _cfg(hf_hub_id="timm/deit_small_patch16_224.fb_in1k"),
        "zoomvit_base_patch16_224.deit_in1k": _cfg(hf_hub_id="timm/deit_base_patch16_224.fb_in1k"),
        "zoomvit_demo_patch8_64": _cfg(
            num_classes=10, input_size=(3, 64, 64), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3
        ),
        "zoomvit_test_patch8_32": _cfg(
            num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3
        ),
    }
)


@register_model
def zoomvit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> ZoomViT:
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_zoomvit("zoomvit_tiny_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def zoomvit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> ZoomViT:
    """DeiT-S backbone (dim 384, depth 12, heads 6) with the zoom tokenizer."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_zoomvit("zoomvit_small_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def zoomvit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ZoomViT:
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_zoomvit("zoomvit_base_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def zoomvit_demo_patch8_64(pretrained: bool = False, **kwargs: Any) -> ZoomViT:
    """For the demo data: 64 px images, 8x8 grid of 8 px patches (zoomed: 4 px)."""
    args = dict(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10, zoomer_width=16, zoomer_depth=1
    )
    return _create_zoomvit("zoomvit_demo_patch8_64", pretrained, **{**args, **kwargs})


@register_model
def zoomvit_test_patch8_32(pretrained: bool = False, **kwargs: Any) -> ZoomViT:
    """A few-thousand-parameter model for tests."""
    args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, zoomer_width=8, zoomer_depth=1
    )
    return _create_zoomvit("zoomvit_test_patch8_32", pretrained, **{**args, **kwargs})
