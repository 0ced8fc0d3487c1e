"""The sections of the models a run trains: the teacher, the Zoomer, ZoomViT and the baselines, with their
init checks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from zoomvit.config.base import Section
from zoomvit.config.training import DistillConfig, TrainConfig, cached_logits_conflicts

INPUT_SIZE = (
    "decode the stored images at this size for this model (its own pixels, e.g. a 128 px source for a "
    "64 px pipeline) instead of data.image_size; a ViT's img_size must match it"
)


class TeacherConfig(Section):
    """The teacher ViT: a timm name, optionally pretrained (hub) or from a local checkpoint. With
    ``input_size`` it trains and is attributed on the images decoded at that size (the relevance maps
    are then resampled to ZoomViT's grid)."""

    model: str = "vit_demo_patch8_64"
    pretrained: bool = False
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: int | None = Field(None, ge=8, description=INPUT_SIZE)
    train: TrainConfig | None = Field(default_factory=lambda: TrainConfig(epochs=15))


class ZoomerConfig(Section):
    """The Zoomer: ``head`` global (the official one: every cell's score sees the whole image) or
    local (a 1x1 conv on the pooled grid). It trains on random resized crops of the images and the
    teacher maps (the same boxes), as ZoomViT training will show it: keep ``train.random_resized_crop``
    equal to ``zoomvit.train.random_resized_crop``."""

    width: int = Field(32, ge=4)
    depth: int = Field(2, ge=1)
    head: Literal["global", "local"] = "global"
    loss: Literal["mse", "bce"] = "bce"
    topk_fraction: float = Field(0.25, gt=0, le=1)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=4, lr=2e-3))


INIT_FROM_TEACHER = (
    "start from the teacher stage's trained weights, as the paper fine-tunes a pretrained ViT "
    "(the teacher becomes an upstream stage; each of the baseline's `others` has its own switch)"
)


def _one_init(section) -> None:
    chosen = [k for k in ("pretrained", "init_checkpoint", "init_from_teacher") if getattr(section, k)]
    if len(chosen) > 1:
        raise ValueError(f"choose one way to initialise the weights, got {' and '.join(chosen)}")


def _cached_logits_need_plain_views(section) -> None:
    if section.distill.mode != "none" and section.distill.source == "cache":
        conflicts = cached_logits_conflicts(section.train.model_dump())
        if conflicts:
            raise ValueError(
                f"distill.source=cache: the cached teacher logits describe the unaugmented image, but the recipe "
                f"augments ({', '.join(conflicts)}); use distill.source=model or turn those off"
            )


class ZoomViTConfig(Section):
    """ZoomViT: the timm variant, how it zooms, its operating point for evaluation, and the range of
    operating points training draws from (one per image).

    ``zoom_source``: ``upsample`` (the paper: zoomed cells re-read the image up-sampled with
    ``zoom_resample``, ``nearest`` as the official code) or ``highres`` (zoomed cells read a copy
    decoded at twice the input resolution: real pixels; only ZoomViT stages decode it).
    ``merge``: what a zoomed cell's fine tokens do to its own token: ``replace`` (the paper), ``add``
    (the cell's token stays, its four fine tokens join it) or ``fold`` (one token per cell, the fine
    embeddings added through a zero-initialised projection). ``zoom_cells``: zoom exactly that many
    cells per image, top-k by the Zoomer (every image the same shape). ``detail_gate`` (highres only):
    zoom only cells whose 2x copy holds more than this RMS of detail beyond the base view.
    Training draws each image's alpha uniformly from ``train_alpha``, or, with ``train_budget``
    (low, high) set, its token budget (zoomed cells uniform between the two); evaluation must stay
    inside what training covered.
    """

    model: str = "zoomvit_demo_patch8_64"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = False
    alpha: float = 0.5
    train_alpha: tuple[float, float] = (0.0, 1.0)
    train_budget: tuple[int, int] | None = None
    coarse_alpha: float | None = None
    keep_rate: float = Field(1.0, gt=0, le=1)
    token_budget: int | None = None
    merge: Literal["replace", "add", "fold"] = "replace"
    zoom_cells: int | None = Field(None, ge=0)
    detail_gate: float | None = Field(None, ge=0)
    zoom_source: Literal["upsample", "highres"] = "upsample"
    zoom_resample: Literal["nearest", "bilinear"] = "nearest"
    target_tokens: float | None = Field(
        None,
        gt=0,
        description="mean tokens per image to calibrate alpha to on the calibration slice "
        "(replaces alpha and train_alpha)",
    )
    target_gflops: float | None = Field(
        None, gt=0, description="GFLOPs per image (Zoomer included) to calibrate alpha to, as target_tokens"
    )
    init_checkpoint: str | None = Field(
        None, description="ViT/DeiT weights to start from (position embedding resampled)"
    )
    init_from_teacher: bool = Field(False, description=INIT_FROM_TEACHER)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _alpha_range(self) -> ZoomViTConfig:
        _one_init(self)
        _cached_logits_need_plain_views(self)
        lo, hi = self.train_alpha
        if not lo <= hi:
            raise ValueError(f"train_alpha must be (low, high) with low <= high, got {self.train_alpha}")
        if self.coarse_alpha is not None and self.coarse_alpha > min(lo, self.alpha):
            raise ValueError(f"coarse_alpha {self.coarse_alpha} must not exceed alpha or the low end of train_alpha")
        if self.target_tokens is not None and self.target_gflops is not None:
            raise ValueError("set one of target_tokens and target_gflops")
        if self.calibrated and self.trains_in_budget_mode:
            raise ValueError(
                "target_tokens/target_gflops calibrate alpha: they do not combine with token_budget or train_budget"
            )
        if self.zoom_cells is not None and (self.calibrated or self.token_budget is not None or self.train_budget):
            raise ValueError("zoom_cells fixes the zoomed cells: it does not combine with a token budget or a target")
        if self.merge == "fold" and (self.token_budget is not None or self.train_budget is not None):
            raise ValueError("merge=fold keeps one token per cell: fix its zoomed cells with zoom_cells")
        if self.merge == "fold" and self.target_tokens is not None:
            raise ValueError("merge=fold keeps one token per cell: calibrate it with target_gflops")
        if self.merge != "replace" and (self.coarse_alpha is not None or self.keep_rate < 1):
            raise ValueError(f"coarse_alpha and keep_rate combine only with merge=replace, got merge={self.merge}")
        if self.detail_gate is not None and self.zoom_source != "highres":
            raise ValueError("detail_gate measures what the 2x copy adds: it needs zoom_source=highres")
        if self.train_budget is not None and not self.train_budget[0] <= self.train_budget[1]:
            raise ValueError(f"train_budget must be (low, high) with low <= high, got {self.train_budget}")
        if self.zoom_source == "highres":
            t = self.train
            mixing = [
                n
                for n, on in (("mixup", t.mixup > 0), ("cutmix", t.cutmix > 0), ("rand_augment", t.rand_augment))
                if on
            ]
            if mixing:
                raise ValueError(
                    f"zoom_source=highres: {', '.join(mixing)} would change the image but not its 2x copy; "
                    "turn them off"
                )
        return self

    @property
    def reads_highres(self) -> bool:
        """Whether ZoomViT's stages need the 2x resolution copy of every image."""
        return self.zoom_source == "highres"

    @property
    def calibrated(self) -> bool:
        """alpha and train_alpha come from calibration on the held-out slice, not from the config."""
        return self.target_tokens is not None or self.target_gflops is not None

    @property
    def trains_in_budget_mode(self) -> bool:
        return self.train_budget is not None or self.token_budget is not None

    @property
    def train_budget_range(self) -> tuple[int, int] | None:
        """The token budgets training covers (``train_budget``, else the fixed ``token_budget``)."""
        if self.train_budget is not None:
            return self.train_budget
        return None if self.token_budget is None else (self.token_budget, self.token_budget)


class BaselineModel(Section):
    """One more timm classifier trained with the baseline's recipe (Swin, hybrid CNN-ViT, ...)."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: int | None = Field(None, ge=8, description=INPUT_SIZE)
    pretrained: bool = False
    init_checkpoint: str | None = None
    init_from_teacher: bool = Field(
        False, description="start from the teacher's weights, resampled to this model's patch grid where it is a ViT"
    )

    @model_validator(mode="after")
    def _init(self) -> BaselineModel:
        _one_init(self)
        return self


class BaselineConfig(Section):
    """The baseline: any timm classifier (``model``), plus ``others`` trained the same way and
    shown beside it in the evaluate stage."""

    model: str = "vit_demo_patch8_64"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = False
    init_checkpoint: str | None = None
    init_from_teacher: bool = Field(False, description=INIT_FROM_TEACHER)
    input_sizes: tuple[int, ...] = Field(
        (),
        description="the baseline family: the same model, init and recipe again at each of these input sizes, "
        "each decoding the stored images at its own size (a finer or coarser uniform grid over real pixels, "
        "never a resize of the data.image_size decode), named baseline_<size>px",
    )
    others: tuple[BaselineModel, ...] = ()
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> BaselineConfig:
        _one_init(self)
        _cached_logits_need_plain_views(self)
        if any(size < 1 for size in self.input_sizes) or len(set(self.input_sizes)) != len(self.input_sizes):
            raise ValueError(f"baseline.input_sizes must be distinct positive sizes, got {list(self.input_sizes)}")
        names = [m.name for m in self.members]
        if "baseline" in names or len(set(names)) != len(names):
            raise ValueError(
                f"baseline.others names must be unique and not 'baseline' or baseline_<size>px, got {names}"
            )
        return self

    @property
    def members(self) -> tuple[BaselineModel, ...]:
        """Every baseline beside the main one: the input-size family, then ``others``."""
        return self.family + self.others

    @property
    def family(self) -> tuple[BaselineModel, ...]:
        """The baseline again at each of ``input_sizes``."""
        return tuple(
            BaselineModel(
                name=f"baseline_{size}px",
                model=self.model,
                model_kwargs={**self.model_kwargs, "img_size": size},
                input_size=size,
                pretrained=self.pretrained,
                init_checkpoint=self.init_checkpoint,
                init_from_teacher=self.init_from_teacher,
            )
            for size in self.input_sizes
        )
