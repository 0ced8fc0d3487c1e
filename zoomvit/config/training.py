"""The training recipe every training stage shares, and DeiT-style distillation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from zoomvit.config.base import Section


class TrainConfig(Section):
    """One training recipe, shared by every training stage (Ray Train + DeepSpeed)."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1, description="micro-batch per worker")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float | None = 1.0
    optimizer: str = "adamw"
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    num_workers: int = Field(
        2,
        ge=0,
        description="Ray Train workers; 0 trains in the driver process (Ray Train's local mode: no worker "
        "actors, a world of one), for debugging and tiny runs",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources each training worker asks for, e.g. a node type's custom resource "
        "({cpu_ingest: 1}) or accelerator marker ({'accelerator_type:H100': 0.01}): pins it to those nodes",
    )
    max_failures: int = Field(1, ge=-1)
    seed: int = 0
    random_resized_crop: tuple[float, float] | None = (0.6, 1.0)
    hflip: bool = False
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_batch_size: int = Field(128, ge=1)
    shuffle_buffer: int = Field(
        2048,
        ge=0,
        description="rows in each worker's shuffle buffer, on top of a new block order every epoch; "
        "0 keeps the read order",
    )
    max_train_samples: int | None = None
    rand_augment: str | None = Field(None, description="timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1'")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate (timm drop_path_rate)")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an EMA of the weights; it is evaluated and saved"
    )
    finetune: Literal["full", "linear", "partial"] = "full"
    freeze_blocks: int = Field(0, ge=0, description="partial fine-tuning: the first k transformer blocks stay frozen")

    @model_validator(mode="after")
    def _finetune(self) -> TrainConfig:
        if self.finetune == "partial" and self.freeze_blocks == 0:
            raise ValueError("finetune=partial needs freeze_blocks >= 1")
        if self.finetune != "partial" and self.freeze_blocks:
            raise ValueError("freeze_blocks is only read with finetune=partial")
        if self.ema_decay is not None and self.zero_stage == 3:
            raise ValueError("ema_decay needs whole parameters on every rank: use zero_stage <= 2")
        return self


class DistillConfig(Section):
    """DeiT-style distillation from the teacher stage's model.

    mode: none, soft (KL at temperature tau) or hard (cross-entropy on the teacher's argmax);
    alpha weighs the distillation term. token: a distillation token and head (ZoomViT, timm's
    ``*_distilled_*`` DeiTs); without it the one head takes both losses. source: the teacher run
    on each training batch (model) or its logits cached next to the relevance maps (cache).
    """

    mode: Literal["none", "soft", "hard"] = "none"
    alpha: float = Field(0.5, ge=0, le=1)
    tau: float = Field(1.0, gt=0)
    token: bool = True
    source: Literal["model", "cache"] = "model"


def cached_logits_conflicts(train: dict[str, Any]) -> list[str]:
    """The augmentations of a recipe (a ``TrainConfig`` dump) under which the student sees other
    pixels than the cached teacher logits describe."""
    on = {
        "random_resized_crop": train["random_resized_crop"] is not None,
        "hflip": train["hflip"],
        "rand_augment": train["rand_augment"] is not None,
        "mixup": train["mixup"] > 0,
        "cutmix": train["cutmix"] > 0,
    }
    return [name for name, used in on.items() if used]
