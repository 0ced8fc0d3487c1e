"""Uniform-patch baselines: timm's own VisionTransformer at the sizes of the demo/test ZoomViTs.

Any timm model name works as a baseline too; these variants only add the small shapes timm lacks.
``resize_input=True`` resizes every image to the model's ``img_size`` before the patch embedding: the
same backbone on a finer or coarser uniform grid (more or fewer tokens for every cell), the
compute-matched baseline family that ZoomViT's frontier is compared with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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


class ResizedInputViT(VisionTransformer):
    """A ViT that resizes its input to ``img_size`` first (bilinear; antialiased when shrinking)."""

    def forward_features(self, x_BCHW: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        size = tuple(self.patch_embed.img_size)
        if tuple(x_BCHW.shape[-2:]) != size:
            shrink = x_BCHW.shape[-1] > size[1]
            x_BCHW = F.interpolate(x_BCHW, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        return super().forward_features(x_BCHW, **kwargs)


def _create(
    variant: str,
    pretrained: bool,
    cls: type[VisionTransformer] = VisionTransformer,
    *,
    resize_input: bool = False,
    **kwargs: Any,
) -> VisionTransformer:
    if resize_input:
        if cls is not VisionTransformer:
            raise ValueError(f"{variant}: resize_input is only implemented for the plain ViT")
        img_size, patch = kwargs["img_size"], kwargs["patch_size"]
        if img_size % patch:
            raise ValueError(f"{variant}: img_size {img_size} is not a multiple of the patch size {patch}")
        cls = ResizedInputViT
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def vit_demo_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The demo ZoomViT's backbone with uniform 8 px patches."""
    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    return _create("vit_demo_patch8_64", pretrained, **{**args, **kwargs})


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
