"""Teacher relevance maps on any timm ``VisionTransformer``.

Methods:
- ``grad_rollout``: gradient-weighted attention rollout (Chefer et al., ICCV 2021, "Generic
  Attention-model Explainability"): R = I; per block R <- R + mean_h((dy_c/dA * A)^+) R.
- ``rollout``: attention rollout (Abnar & Zuidema 2020): R = prod_l (0.5 * mean_h A_l + 0.5 * I),
  rows renormalised.
- ``attention``: the last block's class-token attention, averaged over heads.

The map is the decision token's row of R over the patch tokens, on the patch grid. A distilled DeiT
decides with two tokens (its eval logits average the class and distillation heads), so its map is
the mean of both rows. A teacher pooling its patch tokens (``avg``, ``map``) has no decision token
to read relevance from and is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

Method = Literal["grad_rollout", "rollout", "attention"]
METHODS: tuple[str, ...] = ("grad_rollout", "rollout", "attention")


@dataclass(frozen=True)
class RelevanceResult:
    """maps_BHW: relevance on the patch grid; target_B: the class explained; logits_BK: the teacher's."""

    maps_BHW: torch.Tensor
    target_B: torch.Tensor
    logits_BK: torch.Tensor

    @property
    def pred_B(self) -> torch.Tensor:
        return self.logits_BK.argmax(dim=1)

    @property
    def prob_B(self) -> torch.Tensor:
        """The teacher's softmax probability of its own prediction."""
        return self.logits_BK.softmax(dim=1).max(dim=1).values


@contextmanager
def attention_probes(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record every block's attention probabilities (B, heads, N, N) during forward passes.

    Switches timm's fused attention off on each block (the softmax must be materialised) and
    restores each block's own setting afterwards.
    """
    blocks = list(getattr(model, "blocks", []))
    attns = [getattr(block, "attn", None) for block in blocks]
    if not blocks or any(a is None or not hasattr(a, "fused_attn") or not hasattr(a, "attn_drop") for a in attns):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer with standard attention blocks")
    recorded: list[torch.Tensor] = []
    saved = [a.fused_attn for a in attns]
    hooks = []
    try:
        for a in attns:
            a.fused_attn = False
            # attn_drop receives the softmax output: its forward hook sees the probabilities.
            hooks.append(a.attn_drop.register_forward_hook(lambda _m, _inp, out: recorded.append(out)))
        yield recorded
    finally:
        for h in hooks:
            h.remove()
        for a, fused in zip(attns, saved):
            a.fused_attn = fused


def relevance_maps(
    model: nn.Module,
    images_BCHW: torch.Tensor,
    *,
    method: Method = "grad_rollout",
    labels_B: torch.Tensor | None = None,
) -> RelevanceResult:
    """Batched relevance maps of a timm ViT teacher, for ``labels_B`` or else its own prediction."""
    if method not in METHODS:
        raise ValueError(f"unknown relevance method {method!r}; choose one of {METHODS}")
    grid = tuple(model.patch_embed.grid_size)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    rows = decision_rows(model)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), attention_probes(model) as attns:
            logits = model(images_BCHW)
            target = logits.argmax(dim=1) if labels_B is None else labels_B.to(logits.device).long()
            if method == "grad_rollout":
                score = logits.gather(1, target[:, None]).sum()
                grads = torch.autograd.grad(score, attns)
                R = _grad_rollout(attns, grads)
            elif method == "rollout":
                R = _rollout(attns)
            else:
                R = attns[-1].detach().mean(dim=1)
        decision = R[:, rows, prefix:].mean(dim=1)
        maps = decision.reshape(-1, *grid).float().clamp(min=0)
        return RelevanceResult(maps_BHW=maps.detach(), target_B=target.detach(), logits_BK=logits.detach())
    finally:
        model.train(was_training)


def decision_rows(model: nn.Module) -> list[int]:
    """The token rows the teacher's logits are read from: the class token, plus the distillation
    token of a distilled DeiT (timm's ``dist_token``)."""
    if int(getattr(model, "num_prefix_tokens", 1)) < 1 or not getattr(model, "has_class_token", True):
        raise ValueError("relevance maps need a teacher with a class token")
    pool = getattr(model, "global_pool", "token")
    if pool != "token":
        raise ValueError(
            f"the teacher pools its patch tokens (global_pool={pool!r}): no single token decides the class, "
            "so rollout has no row to read; use a class-token teacher (global_pool='token')"
        )
    return [0, 1] if getattr(model, "dist_token", None) is not None else [0]


def _grad_rollout(attns: list[torch.Tensor], grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    B, _, N, _ = attns[0].shape
    R = torch.eye(N, device=attns[0].device, dtype=torch.float32).expand(B, N, N).clone()
    for A, G in zip(attns, grads):
        cam = (G.float() * A.detach().float()).clamp(min=0).mean(dim=1)
        R = R + torch.bmm(cam, R)
    return R


def _rollout(attns: list[torch.Tensor]) -> torch.Tensor:
    B, _, N, _ = attns[0].shape
    eye = torch.eye(N, device=attns[0].device, dtype=torch.float32)
    R = eye.expand(B, N, N).clone()
    for A in attns:
        a = 0.5 * A.detach().float().mean(dim=1) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        R = torch.bmm(a, R)
    return R


def normalize_maps(maps_BHW: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image min-max normalisation to [0, 1] (the Zoomer's regression target)."""
    flat = maps_BHW.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=eps)).view_as(maps_BHW)
