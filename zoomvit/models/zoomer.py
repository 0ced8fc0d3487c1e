"""The Zoomer: a light residual CNN that predicts where the class-decisive regions are.

Following the official ZoomViT: a ResNet stem and first residual stage (timm's ``BasicBlock``), then
a head. ``global`` (the official head, the default): features pooled to twice the patch grid, a 1x1
conv to one channel, ReLU, and a linear layer from all 4*gh*gw values to the gh*gw cells, so each
cell's score sees the whole image. ``local``: pooled straight to the grid and a 1x1 conv, so a cell's
score sees only its own receptive field. A sigmoid gives the importance in [0, 1].

A frozen Zoomer stays in fp32 when its parent is cast to bf16/fp16 (DeepSpeed casts the whole
model): quantised scores tie and move cells across a threshold.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.resnet import BasicBlock

ZoomerHead = Literal["global", "local"]
ZOOMER_HEADS: tuple[str, ...] = ("global", "local")


class Zoomer(nn.Module):
    def __init__(
        self,
        *,
        grid: tuple[int, int],
        width: int = 64,
        depth: int = 2,
        in_chans: int = 3,
        stem_stride: int = 4,
        head: ZoomerHead = "global",
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if head not in ZOOMER_HEADS:
            raise ValueError(f"head must be one of {ZOOMER_HEADS}, got {head!r}")
        self.grid = tuple(grid)
        self.head_kind = head
        conv_stride = 2 if stem_stride >= 2 else 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=7, stride=conv_stride, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_stride == 4 else nn.Identity(),
        )
        self.stage = nn.Sequential(*[BasicBlock(width, width) for _ in range(depth)])
        self.head = nn.Conv2d(width, 1, kernel_size=1)
        gh, gw = self.grid
        self.project = None
        if head == "global":
            self.project = nn.Linear(4 * gh * gw, gh * gw)
            with torch.no_grad():
                # The stage's features are non-negative, so a 1x1 conv with random signs is often
                # negative at every position and the ReLU passes nothing, ever (6 of 20 seeds at widths
                # 8-64): non-negative weights start it open.
                self.head.weight.abs_()
                self.head.bias.zero_()
                # Start the global layer as each cell's 2x2 average (the local head), so it begins
                # from a spatially sensible map and learns what it gains from the whole image.
                self.project.weight.copy_(_cell_average(gh, gw))
                self.project.bias.zero_()
        self.frozen = False

    def forward_logits(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.stem(images_BCHW.to(self.head.weight.dtype)))
        gh, gw = self.grid
        if self.project is None:
            return self.head(F.adaptive_avg_pool2d(x, self.grid)).squeeze(1)
        x = F.relu(self.head(F.adaptive_avg_pool2d(x, (2 * gh, 2 * gw))))
        return self.project(x.flatten(1)).view(-1, gh, gw)

    def forward(self, images_BCHW: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
        """Importance of every patch-grid cell, in [0, 1] (or as logits): (B, gh, gw), fp32 once frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.forward_logits(images_BCHW)
        return out if logits else out.sigmoid()

    def freeze(self) -> Zoomer:
        """Stop training the Zoomer: no gradients, BatchNorm statistics fixed, weights kept in fp32."""
        self.frozen = True
        self.requires_grad_(False)
        self.eval()
        return self.float()

    def train(self, mode: bool = True) -> Zoomer:
        return super().train(mode and not self.frozen)

    def _apply(self, fn, recurse: bool = True):
        if not self.frozen:
            return super()._apply(fn, recurse)
        # device moves apply, dtype casts do not (casting to bf16 and back would already lose precision)
        return super()._apply(lambda t: t.to(fn(t).device) if t.is_floating_point() else fn(t), recurse)


def _cell_average(gh: int, gw: int) -> torch.Tensor:
    """(gh*gw, 4*gh*gw) weights averaging each cell's 2x2 block of a (2gh, 2gw) raster."""
    r, c = torch.meshgrid(torch.arange(2 * gh), torch.arange(2 * gw), indexing="ij")
    cell = ((r // 2) * gw + c // 2).flatten()
    return torch.nn.functional.one_hot(cell, gh * gw).T.float() / 4
