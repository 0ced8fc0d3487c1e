"""Packed variable-length sequences: a batch's images with different token counts run as one sequence
of their real tokens (NaViT's "patch n' pack"), attention restricted to each image.

The real tokens of every image are concatenated into ``(N, D)`` (``N`` = the sum of the lengths, no
padding); per-token layers (norms, MLP, projections) run on it directly, and attention runs through
``scaled_dot_product_attention`` on nested jagged tensors (one jagged dimension: each image attends to
its own tokens only). Nothing is computed for padding, and no float mask keeps SDPA off its fused
kernels. The padded path (pad to the longest, mask) is the reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pack(x_BLD: torch.Tensor, keep_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of each image, image after image (in their order), as ``(N, D)``, and the
    offsets ``(B + 1,)`` where each image starts."""
    lengths_B = keep_BL.sum(dim=1)
    offsets = torch.cat([lengths_B.new_zeros(1), lengths_B.cumsum(0)])
    return x_BLD[keep_BL], offsets


def unpack(x_ND: torch.Tensor, keep_BL: torch.Tensor) -> torch.Tensor:
    """``(B, L, D)`` with the packed tokens back in their places and zeros where nothing was kept."""
    out = x_ND.new_zeros(*keep_BL.shape, x_ND.shape[-1])
    out[keep_BL] = x_ND
    return out


def packed_attention(attn: nn.Module, x_ND: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """timm's ``Attention`` (its own weights) over packed tokens, each image attending to its own."""
    N, _ = x_ND.shape
    qkv = attn.qkv(x_ND).reshape(N, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)  # (N, H, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)

    def jagged(t: torch.Tensor) -> torch.Tensor:  # (B, H, j, hd), contiguous before the transpose as SDPA wants
        return torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)

    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), dropout_p=dropout)
    out = out.transpose(1, 2).values().reshape(N, attn.num_heads * attn.head_dim)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x_ND).sigmoid()
    return attn.proj_drop(attn.proj(attn.norm(out)))


def packed_block(block: nn.Module, x_ND: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """timm's pre-norm ``Block`` over packed tokens."""
    x_ND = x_ND + block.drop_path1(block.ls1(packed_attention(block.attn, block.norm1(x_ND), offsets)))
    return x_ND + block.drop_path2(block.ls2(block.mlp(block.norm2(x_ND))))
