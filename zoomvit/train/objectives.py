"""What each training task optimises and reports: the model its spec describes, its loss and its
metrics, independent of Ray and DeepSpeed; and a trained model rebuilt for inference (:func:`load_trained`).

A task is built on every worker from its typed spec (:mod:`zoomvit.train.task_specs`), the training
recipe (``TrainConfig``) and a seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoomvit.models  # noqa: F401  (registers the timm variants)
from zoomvit.config import TrainConfig, cached_logits_conflicts
from zoomvit.errors import UserError
from zoomvit.models import Zoomer, ZoomViT, load_pretrained
from zoomvit.models.loading import load_state_dict_file
from zoomvit.models.tokenizer import budget_zoom_cells
from zoomvit.train.data import Views, augment, to_model_input
from zoomvit.train.task_specs import ClassifierSpec, TaskSpec, ZoomerSpec, ZoomViTSpec


def build_task(spec: TaskSpec, train: TrainConfig, *, seed: int = 0) -> Task:
    """The task a spec describes, trained with ``train``; ``seed`` drives its augmentation draws."""
    if isinstance(spec, ZoomViTSpec):
        return ZoomViTTask(spec, train, seed=seed)
    if isinstance(spec, ClassifierSpec):
        return ClassifierTask(spec, train, seed=seed)
    if isinstance(spec, ZoomerSpec):
        return ZoomerTask(spec, train, seed=seed)
    raise TypeError(f"not a task spec: {type(spec).__name__}")


class Task:
    def __init__(self, spec: TaskSpec, train: TrainConfig, *, seed: int = 0) -> None:
        assert isinstance(train, TrainConfig)
        self.spec = spec
        self.train = train
        self.mean, self.std = list(spec.mean), list(spec.std)
        self.generator = torch.Generator().manual_seed(seed)

    def inputs(self, batch: dict[str, torch.Tensor], dtype: torch.dtype, column: str = "image") -> torch.Tensor:
        return to_model_input(batch[column], self.mean, self.std).to(dtype)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], dtype: torch.dtype
    ) -> dict[str, float]:
        """Sums over the given batches, with the sample count under ``n`` (ranks add them up)."""
        raise NotImplementedError


def load_trained(spec: TaskSpec, weights: str | Path) -> nn.Module:
    """A trained stage model for inference: the spec's architecture with the stage's weights, in eval mode."""
    model = build_task(spec.for_inference(), TrainConfig()).build_model()
    model.load_state_dict(load_state_dict_file(weights))
    if isinstance(model, Zoomer):
        model.freeze()
    elif isinstance(model, ZoomViT) and model.zoomer is not None:
        model.zoomer.freeze()
    return model.eval()


def apply_finetune(model: nn.Module, strategy: str, freeze_blocks: int = 0) -> dict[str, int]:
    """Freeze parameters for a fine-tuning strategy; returns the trainable and total parameter counts.

    full: everything trains; linear: the classifier head(s) only; partial: all but the patch
    embedding, prefix tokens, position embedding and the first ``freeze_blocks`` blocks. A
    ZoomViT's zoom-level embedding and distillation token, new to any pretrained ViT, train in
    every strategy; a frozen Zoomer stays frozen.
    """
    if strategy not in ("full", "linear", "partial"):
        raise ValueError(f"unknown fine-tuning strategy {strategy!r}")
    always = {"zoom_embed", "dist_token"} if isinstance(model, ZoomViT) else set()
    head_ids: set[int] = set()
    frozen_prefixes: tuple[str, ...] = ()
    if strategy == "linear":
        heads = [m for m in (model.get_classifier(), getattr(model, "head_dist", None)) if m is not None]
        head_ids = {id(p) for m in heads for p in m.parameters()}
    elif strategy == "partial":
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError(f"partial fine-tuning needs a ViT with .blocks; {type(model).__name__} has none")
        if freeze_blocks > len(blocks):
            raise ValueError(f"freeze_blocks={freeze_blocks} but the model has {len(blocks)} blocks")
        frozen_prefixes = (
            "patch_embed.",
            "cls_token",
            "reg_token",
            "pos_embed",
            "norm_pre.",
            *[f"blocks.{i}." for i in range(freeze_blocks)],
        )

    def trains(name: str, p: nn.Parameter) -> bool:
        if name in always or strategy == "full":
            return True
        if strategy == "linear":
            return id(p) in head_ids
        return not name.startswith(frozen_prefixes)

    for name, p in model.named_parameters():
        if name.startswith("zoomer."):
            continue
        p.requires_grad_(trains(name, p))
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def distillation_loss(student_BK: torch.Tensor, teacher_BK: torch.Tensor, *, mode: str, tau: float) -> torch.Tensor:
    """DeiT's distillation term: KL at temperature ``tau`` (soft) or cross-entropy on the teacher's argmax (hard)."""
    if mode == "soft":
        s = F.log_softmax(student_BK.float() / tau, dim=-1)
        t = F.log_softmax(teacher_BK.float() / tau, dim=-1)
        return F.kl_div(s, t, reduction="batchmean", log_target=True) * tau * tau
    if mode == "hard":
        return F.cross_entropy(student_BK.float(), teacher_BK.argmax(dim=-1))
    raise ValueError(f"unknown distillation mode {mode!r}")


class ClassifierTask(Task):
    """A timm classifier (teacher or baseline): cross-entropy with optional mixup/cutmix and
    smoothing, DeiT distillation, a fine-tuning strategy and stochastic depth."""

    spec: ClassifierSpec

    def __init__(self, spec: ClassifierSpec, train: TrainConfig, *, seed: int = 0) -> None:
        super().__init__(spec, train, seed=seed)
        self.distill = spec.distill
        self.teacher: nn.Module | None = None
        self.mixup = None
        if self.distill.mode != "none" and self.distill.source == "cache":
            augmentations = cached_logits_conflicts(train.model_dump())
            if augmentations:
                raise ValueError(
                    f"cached teacher logits describe the unaugmented image, not the view the student sees "
                    f"({', '.join(augmentations)}): use distill.source=model, or turn those off"
                )
        if train.mixup > 0 or train.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=train.mixup,
                cutmix_alpha=train.cutmix,
                label_smoothing=train.label_smoothing,
                num_classes=spec.num_classes,
            )

    @property
    def distilled(self) -> bool:
        return self.distill.mode != "none"

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = {**self.spec.model_kwargs, "num_classes": self.spec.num_classes}
        if self.train.drop_path:
            kwargs["drop_path_rate"] = self.train.drop_path
        return kwargs

    def build_model(self) -> nn.Module:
        kwargs = self.model_kwargs()
        try:
            model = timm.create_model(self.spec.model, pretrained=self.spec.pretrained, **kwargs)
        except TypeError as err:
            if "img_size" not in kwargs:
                raise
            raise ValueError(
                f"an input size (baseline.input_sizes, input_size) builds the model with img_size=..., which "
                f"{self.spec.model} does not take: use a ViT (e.g. one registered in zoomvit.models.baseline), "
                "or leave input_sizes empty"
            ) from err
        return self._prepare(model)

    def _prepare(self, model: nn.Module) -> nn.Module:
        if self.spec.init_checkpoint:
            loaded = load_pretrained(model, load_state_dict_file(self.spec.init_checkpoint))
            unfit = [k for k in loaded["missing"] if k.startswith("patch_embed.")]
            if unfit:
                raise UserError(
                    f"{self.spec.model}: its init checkpoint has no patch embedding that fits ({', '.join(unfit)}), "
                    "so training would start from a random one (measured: a student of a conv-stem teacher stays "
                    "near chance). Initialise from a ViT with the same patch embedding (init_checkpoint), or set "
                    "init_from_teacher=false"
                )
        if self.distilled and self.distill.token:
            if not hasattr(model, "set_distilled_training"):
                raise ValueError(
                    f"{self.spec.model} has no distillation token: pick a *_distilled_* model (or ZoomViT), "
                    "or set distill.token=false to distil into the class head"
                )
            model.set_distilled_training(True)
        self.param_counts = apply_finetune(model, self.train.finetune, self.train.freeze_blocks)
        return model

    def views(self, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> Views:
        """The augmented training views of a batch."""
        train = self.train
        return augment(
            self.inputs(batch, dtype),
            scale=train.random_resized_crop,
            hflip=train.hflip,
            generator=self.generator,
        )

    def forward(self, model: nn.Module, views: Views):
        """Training logits, or (class logits, distillation logits) for a model with a distillation token."""
        return model(views.x_BCHW)

    def teacher_logits(self, batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.distill.source == "cache":
            if "teacher_logits" not in batch:
                raise ValueError("distill.source=cache but the batch carries no teacher_logits")
            return batch["teacher_logits"].float()
        if self.teacher is None:
            from zoomvit.relevance.teacher import load_teacher

            assert self.spec.distill_teacher is not None, "distill.source=model needs the spec's teacher"
            self.teacher = load_teacher(**self.spec.distill_teacher.model_dump()).to(x.device)
            self.teacher.requires_grad_(False)
        with torch.no_grad():
            return self.teacher(x.to(next(self.teacher.parameters()).dtype)).float()

    def train_loss(self, model, batch, dtype):
        train = self.train
        views = self.views(batch, dtype)
        x = views.x_BCHW
        target = batch["label"].long()
        soft = None
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, soft = self.mixup(x, target)
            views = views._replace(x_BCHW=x)
        out = self.forward(model, views)
        logits, logits_dist = out if isinstance(out, tuple) else (out, out)
        if soft is not None:
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), target, label_smoothing=train.label_smoothing)
        if not self.distilled:
            return loss
        kd = distillation_loss(logits_dist, self.teacher_logits(batch, x), mode=self.distill.mode, tau=self.distill.tau)
        return (1 - self.distill.alpha) * loss + self.distill.alpha * kd

    @torch.no_grad()
    def evaluate(self, model, batches, dtype):
        sums = dict.fromkeys(("n", "val_loss", "val_top1", "val_top5", "val_tokens_per_img"), 0.0)
        for batch in batches:
            logits, tokens_B = self.predict(model, batch, dtype)
            logits = logits.float()
            label = batch["label"].long()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums["n"] += len(label)
            sums["val_loss"] += float(F.cross_entropy(logits, label, reduction="sum"))
            sums["val_top1"] += int((top5[:, 0] == label).sum())
            sums["val_top5"] += int((top5 == label[:, None]).any(dim=1).sum())
            sums["val_tokens_per_img"] += float(tokens_B.sum())
        return sums

    def predict(
        self, model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Evaluation logits and tokens per image."""
        x = self.inputs(batch, dtype)
        gh, gw = model.patch_embed.grid_size if hasattr(model, "patch_embed") else (0, 0)
        return model(x), np.full(x.shape[0], gh * gw, dtype=np.float64)


class ZoomViTTask(ClassifierTask):
    """ZoomViT with a frozen fp32 Zoomer. In training every image draws its own operating point
    (alpha from ``train_alpha``, or a token budget from ``train_budget``); evaluation uses the model's."""

    spec: ZoomViTSpec

    def build_model(self) -> nn.Module:
        spec = self.spec
        if spec.zoomer_checkpoint is None and not spec.inference:
            raise ValueError(
                "training ZoomViT needs the zoomer stage's trained weights: a random Zoomer would zoom into noise"
            )
        kwargs = self.model_kwargs()
        if self.distilled and self.distill.token:
            kwargs["distilled"] = True
        kwargs.update(
            alpha=spec.alpha,
            coarse_alpha=spec.coarse_alpha,
            keep_rate=spec.keep_rate,
            token_budget=spec.token_budget,
            zoom_cells=spec.zoom_cells,
            zoom_merge=spec.merge,
            detail_gate=spec.detail_gate,
            zoom_source=spec.zoom_source,
            zoom_resample=spec.zoom_resample,
            zoomer_width=spec.zoomer_width,
            zoomer_depth=spec.zoomer_depth,
            zoomer_head=spec.zoomer_head,
        )
        model: ZoomViT = timm.create_model(spec.model, pretrained=spec.pretrained, **kwargs)
        if spec.zoomer_checkpoint is not None:
            model.zoomer.load_state_dict(load_state_dict_file(spec.zoomer_checkpoint))
        model.zoomer.freeze()
        return self._prepare(model)

    @property
    def highres(self) -> bool:
        return self.spec.zoom_source == "highres"

    def inputs(self, batch, dtype, column="image"):
        return super().inputs(batch, torch.float32, column)  # the Zoomer reads fp32; the tokenizer casts

    def views(self, batch, dtype):
        train = self.train
        highres = self.inputs(batch, dtype, "image_hr") if self.highres else None
        return augment(
            self.inputs(batch, dtype),
            scale=train.random_resized_crop,
            hflip=train.hflip,
            generator=self.generator,
            highres_BCHW=highres,
        )

    def operating_points(self, B: int) -> dict[str, torch.Tensor]:
        """Per-image alpha (uniform in ``train_alpha``) or token budget (zoomed cells uniform in ``train_budget``)."""
        if self.spec.zoom_cells is not None:
            return {}
        if self.spec.train_budget is not None:
            lo, hi = (budget_zoom_cells(b, self.spec.num_cells, self.spec.merge) for b in self.spec.train_budget)
            return {"zoom_cells": torch.randint(lo, hi + 1, (B,), generator=self.generator)}
        lo, hi = self.spec.train_alpha
        return {"alpha": torch.empty(B).uniform_(lo, hi, generator=self.generator)}

    def forward(self, model, views):
        B = views.x_BCHW.shape[0]
        return model(views.x_BCHW, highres=views.highres_BCHW, **self.operating_points(B))

    def predict(self, model, batch, dtype):
        highres = self.inputs(batch, dtype, "image_hr") if self.highres else None
        logits, zt = model(self.inputs(batch, dtype), highres=highres, return_tokens=True)
        return logits, zt.num_tokens_B.double().cpu().numpy()


class ZoomerTask(Task):
    """The Zoomer regressing per-image-normalised teacher maps."""

    spec: ZoomerSpec

    def build_model(self) -> nn.Module:
        return Zoomer(grid=self.spec.grid, width=self.spec.width, depth=self.spec.depth, head=self.spec.head)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.spec.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.mse_loss(logits.float().sigmoid(), target.float())

    def train_loss(self, model, batch, dtype):
        """The Zoomer learns on the views ZoomViT training will show it: the same random resized
        crops (maps cropped with the same boxes) and flips."""
        train = self.train
        views = augment(
            self.inputs(batch, dtype),
            scale=train.random_resized_crop,
            hflip=train.hflip,
            generator=self.generator,
            maps_BHW=batch["map"],
        )
        return self._loss(model(views.x_BCHW, logits=True), views.maps_BHW)

    @torch.no_grad()
    def evaluate(self, model, batches, dtype):
        """Pearson and top-k overlap with the teacher on whole val images and (``val_crop_*``) on
        random resized crops of them (a fixed seed, the training crop range or (0.5, 1))."""
        scale = self.train.random_resized_crop or (0.5, 1.0)
        crops = torch.Generator().manual_seed(12345)
        keys = ("val_loss", "val_pearson", "val_topk_overlap", "val_crop_pearson", "val_crop_topk_overlap")
        sums = dict.fromkeys(("n", *keys), 0.0)
        for batch in batches:
            x = self.inputs(batch, dtype)
            target = batch["map"].float()
            logits = model(x, logits=True).float()
            sums["n"] += len(x)
            sums["val_loss"] += float(self._loss(logits, target)) * len(x)
            sums["val_pearson"] += float(pearson_per_image(logits.sigmoid(), target).sum())
            sums["val_topk_overlap"] += float(topk_overlap(logits, target, self.spec.topk_fraction).sum())
            views = augment(x, scale=scale, hflip=False, generator=crops, maps_BHW=target)
            crop_logits = model(views.x_BCHW, logits=True).float()
            sums["val_crop_pearson"] += float(pearson_per_image(crop_logits.sigmoid(), views.maps_BHW).sum())
            sums["val_crop_topk_overlap"] += float(
                topk_overlap(crop_logits, views.maps_BHW, self.spec.topk_fraction).sum()
            )
        return sums


def pearson_per_image(pred_BHW: torch.Tensor, target_BHW: torch.Tensor) -> torch.Tensor:
    p = pred_BHW.flatten(1) - pred_BHW.flatten(1).mean(1, keepdim=True)
    t = target_BHW.flatten(1) - target_BHW.flatten(1).mean(1, keepdim=True)
    return (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp(min=1e-8)


def topk_overlap(pred_BHW: torch.Tensor, target_BHW: torch.Tensor, fraction: float) -> torch.Tensor:
    """Share of the teacher's top-k cells that are also among the prediction's top-k."""
    cells = pred_BHW[0].numel()
    k = max(1, math.ceil(fraction * cells))
    p = F.one_hot(pred_BHW.flatten(1).topk(k, dim=1).indices, cells).sum(1)
    t = F.one_hot(target_BHW.flatten(1).topk(k, dim=1).indices, cells).sum(1)
    return (p * t).sum(1).float() / k
