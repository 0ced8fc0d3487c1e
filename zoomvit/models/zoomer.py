"""The Zoomer: a light residual CNN that predicts where the class-decisive regions are.

Following the official ZoomViT: a ResNet stem and first residual stage (timm's ``BasicBlock``),
pooled onto the backbone's patch grid, a 1x1 conv to one channel and a sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.resnet import BasicBlock


class Zoomer(nn.Module):
    def __init__(
        self,
        *,
        grid: tuple[int, int],
        width: int = 64,
        depth: int = 2,
        in_chans: int = 3,
        stem_stride: int = 4,
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.grid = tuple(grid)
        conv_stride = 2 if stem_stride >= 2 else 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=7, stride=conv_stride, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_stride == 4 else nn.Identity(),
        )
        self.stage = nn.Sequential(*[BasicBlock(width, width) for _ in range(depth)])
        self.head = nn.Conv2d(width, 1, kernel_size=1)
        self.frozen = False

    def forward_logits(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.stem(images_BCHW))
        x = F.adaptive_avg_pool2d(x, self.grid)
        return self.head(x).squeeze(1)

    def forward(self, images_BCHW: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
        """Importance of every patch-grid cell, in [0, 1] (or as logits): (B, gh, gw)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.forward_logits(images_BCHW)
        return out if logits else out.sigmoid()

    def freeze(self) -> "Zoomer":
        """Stop training the Zoomer: no gradients, BatchNorm statistics fixed."""
        self.frozen = True
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "Zoomer":
        return super().train(mode and not self.frozen)
