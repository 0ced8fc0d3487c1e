"""Uniform-patch baselines: timm's own VisionTransformer at the sizes of the demo/test ZoomViTs.

Any timm model name works as a baseline too; these variants only add the small shapes timm lacks.
The baseline family (``baseline.input_sizes``) builds the same variant at other ``img_size`` values, each fed
the images decoded at its own size.

``vit_demo_convstem_patch8_64`` is a hybrid teacher: the demo ViT with an overlapping convolutional
stem (Xiao et al. 2021, "Early convolutions help transformers see better") in place of the linear
patch projection. Its tokens keep the 8 px patch grid and a class token, so attention rollout gives
maps on the grid ZoomViT zooms; students cannot inherit the stem (ZoomViT embeds each cell from its
own pixels), only the transformer (``init_from_teacher`` loads what fits).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

default_cfgs = generate_default_cfgs(
    {
        "vit_demo_patch8_64": {
            "num_classes": 10,
            "input_size": (3, 64, 64),
            "crop_pct": 1.0,
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        },
        "vit_demo_convstem_patch8_64": {
            "num_classes": 10,
            "input_size": (3, 64, 64),
            "crop_pct": 1.0,
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        },
        "vit_test_convstem_patch8_32": {
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "crop_pct": 1.0,
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        },
        "vit_test_patch8_32": {
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "crop_pct": 1.0,
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        },
        "deit_demo_distilled_patch8_64": {
            "num_classes": 10,
            "input_size": (3, 64, 64),
            "crop_pct": 1.0,
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        },
        "deit_test_distilled_patch8_32": {
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "crop_pct": 1.0,
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        },
    }
)


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` whose projection is log2(patch) overlapping 3x3 stride-2 convolutions (BatchNorm
    and ReLU between them) instead of one linear P x P projection: the same token grid, tokens that see
    their neighbours' pixels."""

    def __init__(self, *, in_chans: int = 3, embed_dim: int = 768, **kwargs: Any) -> None:
        super().__init__(in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        ph, pw = self.patch_size
        depth = round(math.log2(ph))
        if ph != pw or 2**depth != ph or embed_dim % 2 ** (depth - 1):
            raise ValueError(f"a conv stem needs a square power-of-two patch and embed_dim divisible by "
                             f"2^(depth-1), got patch {self.patch_size} and embed_dim {embed_dim}")  # fmt: skip
        dims = [in_chans] + [embed_dim // 2 ** (depth - 1 - i) for i in range(depth)]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1, bias=i == depth - 1))
            if i < depth - 1:
                layers += [nn.BatchNorm2d(dims[i + 1]), nn.ReLU(inplace=True)]
        self.proj = nn.Sequential(*layers)


def _create(
    variant: str, pretrained: bool, cls: type[VisionTransformer] = VisionTransformer, **kwargs: Any
) -> VisionTransformer:
    img_size, patch = kwargs.get("img_size"), kwargs.get("patch_size")
    if isinstance(img_size, int) and isinstance(patch, int) and img_size % patch:
        raise ValueError(f"{variant}: img_size {img_size} is not a multiple of the patch size {patch}")
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def vit_demo_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The demo ZoomViT's backbone with uniform 8 px patches."""
    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    return _create("vit_demo_patch8_64", pretrained, **{**args, **kwargs})


@register_model
def vit_demo_convstem_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """``vit_demo_patch8_64`` with an overlapping convolutional stem: a hybrid teacher."""
    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    return _create("vit_demo_convstem_patch8_64", pretrained, embed_layer=ConvStemPatchEmbed, **{**args, **kwargs})


@register_model
def vit_test_convstem_patch8_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return _create("vit_test_convstem_patch8_32", pretrained, embed_layer=ConvStemPatchEmbed, **{**args, **kwargs})


@register_model
def vit_test_patch8_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return _create("vit_test_patch8_32", pretrained, **{**args, **kwargs})


@register_model
def deit_demo_distilled_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """``vit_demo_patch8_64`` with DeiT's distillation token and head."""
    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    return _create("deit_demo_distilled_patch8_64", pretrained, cls=VisionTransformerDistilled, **{**args, **kwargs})


@register_model
def deit_test_distilled_patch8_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return _create("deit_test_distilled_patch8_32", pretrained, cls=VisionTransformerDistilled, **{**args, **kwargs})
