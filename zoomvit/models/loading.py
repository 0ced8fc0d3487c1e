"""Reading checkpoints without unpickling, and loading pretrained weights into a model of another
input size, patch grid or head: any timm classifier.

ViT-family position embeddings are resampled on their 2D grid (bicubic, via timm's
``resample_abs_pos_embed``) with the prefix tokens (class, distillation) kept apart; a
distillation position missing from the source starts as the class token's. Other families go
through their own timm ``checkpoint_filter_fn`` (Swin's relative-position tables, ...). Tensors
whose shapes still differ (a head for another class count) keep their initialisation.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer


def adapt_pos_embed(
    pos_1LD: torch.Tensor,
    *,
    src_prefix: int,
    dst_prefix: int,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A ``(1, src_prefix + gh*gw, D)`` position embedding for ``dst_prefix`` prefix tokens on ``new_grid``."""
    prefix, grid = pos_1LD[:, :src_prefix], pos_1LD[:, src_prefix:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer a square grid from {grid.shape[1]} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) != tuple(new_grid):
        grid = resample_abs_pos_embed(grid, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0)
    if dst_prefix <= src_prefix:
        prefix = prefix[:, :dst_prefix]
    else:
        prefix = torch.cat([prefix, prefix[:, :1].expand(-1, dst_prefix - src_prefix, -1)], dim=1)
    return torch.cat([prefix, grid], dim=1)


def _source_prefix(state_dict: dict[str, torch.Tensor]) -> int:
    n = 0
    for key in ("cls_token", "dist_token"):
        n += key in state_dict
    if "reg_token" in state_dict:
        n += state_dict["reg_token"].shape[1]
    return n


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` reshaped for ``model`` where the family allows it (see the module docstring)."""
    state_dict = dict(state_dict.get("model", state_dict.get("state_dict", state_dict)))
    if isinstance(model, VisionTransformer):
        own = model.state_dict()
        pos = state_dict.get("pos_embed")
        if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
            no_embed_class = getattr(model, "no_embed_class", False)
            state_dict["pos_embed"] = adapt_pos_embed(
                pos,
                src_prefix=0 if no_embed_class else _source_prefix(state_dict),
                dst_prefix=0 if no_embed_class else model.num_prefix_tokens,
                new_grid=tuple(model.patch_embed.grid_size),
            )
        weight = state_dict.get("patch_embed.proj.weight")
        if weight is not None and weight.ndim == 4 and weight.shape[-2:] != own["patch_embed.proj.weight"].shape[-2:]:
            state_dict["patch_embed.proj.weight"] = resample_patch_embed(
                weight, list(own["patch_embed.proj.weight"].shape[-2:])
            )
        return state_dict
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return filter_fn(state_dict, model) if filter_fn is not None else state_dict


def fitting_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapted tensors whose names and shapes fit ``model``, and the names of those that do not."""
    adapted = adapt_state_dict(state_dict, model)
    own = model.state_dict()
    fits = {k: v for k, v in adapted.items() if k in own and own[k].shape == v.shape}
    return fits, sorted(k for k in adapted if k not in fits)


def load_pretrained(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load what fits after adapting; returns the keys loaded, skipped (shape or name mismatch) and missing."""
    fits, skipped = fitting_state_dict(state_dict, model)
    result = model.load_state_dict(fits, strict=False)
    return {"loaded": sorted(fits), "skipped": skipped, "missing": sorted(result.missing_keys)}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file read with ``weights_only=True``; a local
    path or a URL (``s3://``, ``gs://``: a stage output in a bucket, read by whichever node needs it)."""
    from zoomvit.data.shards import filesystem, is_url

    if is_url(str(path)):
        try:
            with filesystem(str(path)).open(str(path), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ValueError(f"checkpoint {str(path)!r} does not exist") from None
        name = str(path)
    else:
        if not Path(path).exists():
            raise ValueError(f"checkpoint {str(path)!r} does not exist")
        data, name = None, str(path)
    if name.endswith(".safetensors"):
        from safetensors.torch import load, load_file

        return load(data) if data is not None else load_file(name)
    state = torch.load(io.BytesIO(data) if data is not None else name, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{name!r} does not hold a state dict")
    return state
