"""Typed, validated configuration: one frozen model per pipeline section.

Unknown keys and wrong types are errors that name the offending key. Sections are independent so a
stage's fingerprint covers exactly the settings it reads.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from zoomvit.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoDataConfig(Section):
    """Generate the demo dataset into ``data.root`` when its shards are missing.

    ``preset``: ``default`` (small white digits among dim clutter), ``hard`` (smaller digits, clutter
    of the digit's size in saturated colours up to its brightness, photo backgrounds) or ``fine``
    (the class only in detail above a half-size view's Nyquist frequency, inside a small framed
    panel; store it at twice the model's input: ``image_size: 128`` for a 64 px model); ``difficulty``
    (0..1) sets the digits' knob directly and overrides the preset's."""

    train: int = Field(2048, ge=0)
    val: int = Field(512, ge=0)
    image_size: int = Field(64, ge=16)
    seed: int = 0
    samples_per_shard: int = Field(256, ge=1)
    photo_clutter: bool = False
    preset: Literal["default", "hard", "fine"] = "default"
    difficulty: float | None = Field(None, ge=0, le=1)

    @property
    def effective_difficulty(self) -> float:
        from zoomvit.data.demo import PRESETS

        return PRESETS[self.preset][1] if self.difficulty is None else self.difficulty

    @property
    def style(self) -> str:
        from zoomvit.data.demo import PRESETS

        return PRESETS[self.preset][0]


class DataConfig(Section):
    """Where the shards are and how images become tensors.

    train_shards / val_shards: a path, a brace pattern (``train-{000000..000003}.tar``), a directory
    or a list of those; local, ``s3://``, ``gs://`` or any fsspec URL. Relative paths are taken
    relative to ``root`` when it is set.

    ``decoded``: how training stages hold the decoded images. ``shared``: each split is decoded once
    per pipeline run and kept in Ray's object store for every stage; ``per_stage``: each stage
    decodes and keeps its own copy; ``streamed``: nothing is kept, every epoch reads and decodes the
    training shards again (data sets larger than the object store), with the sample count per epoch
    from the ``_info.json`` beside the shards.
    """

    root: str | None = None
    train_shards: str | list[str] = "train-*.tar"
    val_shards: str | list[str] = "val-*.tar"
    num_classes: int = Field(10, ge=1)
    image_size: int = Field(64, ge=8)
    resize_mode: Literal["center_crop", "resize"] = "center_crop"
    crop_pct: float = Field(1.0, gt=0, le=1)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    class_names: str | None = None
    decoded: Literal["shared", "per_stage", "streamed"] = "shared"
    calibration_fraction: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="share of the training samples (chosen by a hash of the key) held out of every training "
        "stage; ZoomViT's operating point is calibrated on it (zoomvit.target_tokens / target_gflops)",
    )
    demo: DemoDataConfig | None = None

    def at_size(self, size: int | None) -> DataConfig:
        """This data decoded at ``size`` px from the stored images (a model that reads its own pixels);
        itself when ``size`` is None or already the input size."""
        return self if size is None or size == self.image_size else self.model_copy(update={"image_size": size})

    def shard_paths(self, split: Literal["train", "val"]) -> list[str]:
        """The split's shard paths, expanded and sorted (ValueError when none exist)."""
        from zoomvit.data.shards import expand_shards

        return expand_shards({"train": self.train_shards, "val": self.val_shards}[split], root=self.root)


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


class RelevanceConfig(Section):
    method: Literal["grad_rollout", "rollout", "attention"] = "grad_rollout"
    target: Literal["label", "prediction"] = "label"
    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    actor_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per attribution actor; default: num_cpus_per_actor with a GPU, "
        "else the node's CPUs shared by the actors (decode tasks are short and interleave)",
    )
    decode_num_cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs reserved per decode task; differs from num_cpus_per_actor so that Ray Data "
        "does not fuse decoding into the attribution actor and the two run pipelined",
    )
    decode_in_actor: bool = Field(
        False,
        description="each attribution actor decodes its own raw rows (no separate decode tasks): on CPU, "
        "one single-threaded actor per core runs decode + attribution data-parallel, as N plain loops would",
    )
    use_gpu: bool | Literal["auto"] = "auto"
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources each attribution actor asks for, e.g. a node type's custom resource "
        "({cpu_ingest: 1}) or accelerator marker ({'accelerator_type:H100': 0.01}): pins it to those nodes",
    )
    shards_per_group: int = Field(4, ge=1)
    decode_batch_size: int = Field(64, ge=1)
    splits: tuple[Literal["train", "val"], ...] = ("train", "val")

    @model_validator(mode="after")
    def _splits_not_empty(self) -> RelevanceConfig:
        if not self.splits:
            raise ValueError("relevance.splits must name at least one split")
        return self


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
    num_workers: int = Field(2, ge=1)
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


class EvaluateConfig(Section):
    size_buckets: tuple[float, ...] = (0.25, 0.35)
    num_figures: int = Field(6, ge=0)
    alphas: tuple[float, ...] = ()
    budgets: tuple[int, ...] = Field(
        (), description="token budgets to evaluate ZoomViT at (top-k cells zoomed, static length)"
    )


class GatesConfig(Section):
    """Quality floors checked before a stage builds on an upstream model; a pipeline below one stops
    with a message naming the figure, the floor and how to override (``--set gates.<name>=...``).

    teacher_min_top1: the teacher's val top-1 before relevance (None: twice chance, 2 / num_classes);
    zoomer_min_pearson: the Zoomer's val Pearson with the teacher maps before ZoomViT trains on it.
    """

    teacher_min_top1: float | None = Field(None, ge=0, le=1)
    zoomer_min_pearson: float = Field(0.2, ge=-1, le=1)

    def teacher_floor(self, num_classes: int) -> float:
        return min(1.0, 2.0 / num_classes) if self.teacher_min_top1 is None else self.teacher_min_top1


class TrackingConfig(Section):
    """MLflow: ``uri`` else $MLFLOW_TRACKING_URI else a sqlite store in the working directory."""

    uri: str | None = None
    experiment: str = "zoomvit"
    # every trained model becomes a version of "<experiment>-<stage>"; evaluate moves its "candidate" alias
    register_models: bool = True


class PipelineConfig(Section):
    """The whole pipeline: one section per concern (see ``pipelines/configs/*.yaml``)."""

    name: str = "zoomvit"
    artifact_root: str | None = None
    checkpoint_root: str | None = Field(
        None,
        description="where Ray Train keeps the training stages' checkpoints, under <stage>/<fingerprint>: a URL "
        "(s3://, gs://, any fsspec) or a path every node sees; default: inside each stage's output",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    relevance: RelevanceConfig = Field(default_factory=RelevanceConfig)
    zoomer: ZoomerConfig = Field(default_factory=ZoomerConfig)
    zoomvit: ZoomViTConfig = Field(default_factory=ZoomViTConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _teacher_reads_what_students_show(self) -> PipelineConfig:
        size = self.teacher.input_size
        if size is None or size == self.data.image_size:
            return self
        for name, section in (("zoomvit", self.zoomvit), ("baseline", self.baseline)):
            if section.distill.mode != "none" and section.distill.source == "model":
                raise ValueError(
                    f"{name}.distill.source=model runs the teacher on the students' {self.data.image_size} px "
                    f"images, but teacher.input_size is {size}: use distill.source=cache or drop input_size"
                )
        return self

    @model_validator(mode="after")
    def _evaluated_where_trained(self) -> PipelineConfig:
        """ZoomViT is evaluated only at operating points its training covered (no extrapolation)."""
        zv = self.zoomvit
        if zv.calibrated:
            if self.data.calibration_fraction == 0:
                raise ValueError(
                    "zoomvit.target_tokens/target_gflops calibrate on a held-out slice: "
                    "set data.calibration_fraction > 0"
                )
            if self.evaluate.alphas or self.evaluate.budgets:
                raise ValueError(
                    "with a calibrated zoomvit target, evaluate.alphas and evaluate.budgets would lie outside "
                    "what training covered: leave them empty"
                )
            return self
        budgets = [b for b in (zv.token_budget, *self.evaluate.budgets) if b is not None]
        alphas = [*([zv.alpha] if zv.token_budget is None else []), *self.evaluate.alphas]
        if zv.trains_in_budget_mode:
            lo, hi = zv.train_budget_range
            outside = [b for b in budgets if not lo <= b <= hi]
            if outside:
                raise ValueError(
                    f"token budgets {outside} lie outside zoomvit.train_budget {[lo, hi]}: widen train_budget"
                )
            if alphas:
                raise ValueError(
                    f"ZoomViT trains in budget mode but alphas {alphas} are evaluated: evaluate budgets "
                    "(evaluate.budgets, zoomvit.token_budget), or train with train_alpha and no train_budget"
                )
        else:
            lo, hi = zv.train_alpha
            outside = [a for a in alphas if not lo <= a <= hi]
            if outside:
                raise ValueError(
                    f"alphas {outside} lie outside zoomvit.train_alpha {[lo, hi]}: "
                    "widen train_alpha or evaluate inside it"
                )
            if budgets:
                raise ValueError(
                    f"token budgets {budgets} are evaluated but ZoomViT trains with per-image alphas: "
                    "set zoomvit.train_budget to train in budget mode"
                )
        return self


class ConfigError(UserError):
    """A configuration that does not validate; the message names every offending key."""


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML file (or the defaults), apply ``a.b.c=value`` overrides, validate."""
    import yaml
    from pydantic import ValidationError

    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}: {problems}") from None
