"""The training recipe of each training stage (teacher, Zoomer, ZoomViT, baseline): its task spec from
the pipeline config, its data, and the call that trains it (:func:`~zoomvit.train.trainer.run_training`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm

from zoomvit.checkpoints import Checkpoints
from zoomvit.config import PipelineConfig, TrainConfig
from zoomvit.data.shards import sample_count
from zoomvit.errors import UserError
from zoomvit.train.data import DecodedSplits, sample_dataset, with_maps
from zoomvit.train.task_specs import ClassifierSpec, TeacherRef, ZoomerSpec, ZoomViTSpec
from zoomvit.train.trainer import TrainResult, run_training

log = logging.getLogger(__name__)


def _common(config: PipelineConfig) -> dict[str, Any]:
    return {"num_classes": config.data.num_classes, "mean": tuple(config.data.mean), "std": tuple(config.data.std)}


def _train_split(
    config: PipelineConfig,
    train: TrainConfig,
    splits: DecodedSplits | None,
    *,
    highres: bool = False,
    input_size: int | None = None,
):
    """The training split (decoded at ``input_size`` when set), and its sample count when
    ``data.decoded`` streams it (None otherwise)."""
    data = config.data.at_size(input_size)
    count = sample_count(data.shard_paths("train")) if data.decoded == "streamed" else None
    return sample_dataset(
        data, "train", file_shuffle_seed=train.seed, highres=highres, part="fit", splits=splits
    ), count


def teacher_task(config: PipelineConfig) -> ClassifierSpec:
    """The teacher trained from scratch on the shards (a ``teacher.train`` section)."""
    teacher = config.teacher
    return ClassifierSpec(model=teacher.model, model_kwargs=dict(teacher.model_kwargs), **_common(config))


def train_teacher(
    config: PipelineConfig,
    out_dir: Path,
    tracking: dict[str, str] | None = None,
    *,
    splits: DecodedSplits | None = None,
    checkpoints: Checkpoints | None = None,
) -> TrainResult | None:
    """Train the teacher ViT on the shards; None when the config names a pretrained teacher."""
    teacher = config.teacher
    if teacher.pretrained or teacher.checkpoint:
        return None
    if teacher.train is None:
        raise UserError("teacher: set pretrained=true, a checkpoint, or a train section")
    task = teacher_task(config)
    train_ds, streamed = _train_split(config, teacher.train, splits, input_size=teacher.input_size)
    return run_training(
        name="teacher",
        task=task,
        train=teacher.train,
        train_ds=train_ds,
        val_ds=sample_dataset(config.data.at_size(teacher.input_size), "val", splits=splits),
        out_dir=out_dir,
        tracking=tracking,
        streamed_samples=streamed,
        checkpoints=checkpoints,
    )


def zoomvit_grid(config: PipelineConfig) -> tuple[int, int]:
    import zoomvit.models  # noqa: F401

    model = timm.create_model(
        config.zoomvit.model, with_zoomer=False, num_classes=config.data.num_classes, **config.zoomvit.model_kwargs
    )
    return tuple(model.grid)


def zoomer_task(config: PipelineConfig) -> ZoomerSpec:
    z = config.zoomer
    return ZoomerSpec(
        grid=zoomvit_grid(config),
        width=z.width,
        depth=z.depth,
        head=z.head,
        loss=z.loss,
        topk_fraction=z.topk_fraction,
        **_common(config),
    )


def train_zoomer(
    config: PipelineConfig,
    relevance_dir: Path,
    out_dir: Path,
    tracking: dict[str, str] | None = None,
    *,
    splits: DecodedSplits | None = None,
    checkpoints: Checkpoints | None = None,
) -> TrainResult:
    z = config.zoomer
    task = zoomer_task(config)
    grid = task.grid
    train_ds, streamed = _train_split(config, z.train, splits)
    return run_training(
        name="zoomer",
        task=task,
        train=z.train,
        train_ds=with_maps(train_ds, relevance_dir, "train", grid),
        val_ds=with_maps(sample_dataset(config.data, "val", splits=splits), relevance_dir, "val", grid),
        out_dir=out_dir,
        tracking=tracking,
        streamed_samples=streamed,
        checkpoints=checkpoints,
    )


def distill_spec(config: PipelineConfig, distill, teacher_weights: Path | str | None) -> dict[str, Any]:
    """The task's distillation settings; with source=model, how workers rebuild the teacher."""
    spec: dict[str, Any] = {"distill": distill, "distill_teacher": None}
    if distill.mode != "none" and distill.source == "model":
        t = config.teacher
        spec["distill_teacher"] = TeacherRef(
            model=t.model,
            pretrained=t.pretrained,
            checkpoint=None if teacher_weights is None else str(teacher_weights),
            num_classes=config.data.num_classes,
            model_kwargs=dict(t.model_kwargs),
        )
    return spec


def _distill_data(ds, distill, relevance_dir: Path | str | None, split: str):
    if distill.mode == "none" or distill.source != "cache":
        return ds
    if relevance_dir is None:
        raise UserError("distill.source=cache needs the relevance stage's output")
    return with_maps(ds, relevance_dir, split, None, logits=True)


def _init_checkpoint(section, teacher_weights: Path | str | None) -> str | None:
    """The weights training starts from (none when only the architecture is built, to load trained weights)."""
    if not section.init_from_teacher:
        return section.init_checkpoint
    return None if teacher_weights is None else str(teacher_weights)


def _require_teacher_weights(section, teacher_weights: Path | str | None) -> None:
    if section.init_from_teacher and teacher_weights is None:
        raise UserError(
            "init_from_teacher needs the teacher stage's trained weights (a hub teacher has none: use pretrained)"
        )


def zoomvit_task(
    config: PipelineConfig,
    zoomer_weights: Path | str | None,
    teacher_weights: Path | str | None = None,
    *,
    inference: bool = False,
    operating_point: dict[str, Any] | None = None,
) -> ZoomViTSpec:
    """ZoomViT's task spec; ``inference``: only the architecture, to load trained weights into;
    ``operating_point``: a calibrated alpha and train_alpha replacing the config's."""
    zv = config.zoomvit
    gh, gw = zoomvit_grid(config)
    op = operating_point or {"alpha": zv.alpha, "train_alpha": list(zv.train_alpha)}
    return ZoomViTSpec(
        model=zv.model,
        model_kwargs=dict(zv.model_kwargs),
        pretrained=zv.pretrained,
        init_checkpoint=_init_checkpoint(zv, teacher_weights),
        **distill_spec(config, zv.distill, teacher_weights),
        alpha=op["alpha"],
        train_alpha=tuple(op["train_alpha"]),
        train_budget=zv.train_budget_range,
        num_cells=gh * gw,
        coarse_alpha=zv.coarse_alpha,
        keep_rate=zv.keep_rate,
        token_budget=zv.token_budget,
        zoom_cells=zv.zoom_cells,
        merge=zv.merge,
        detail_gate=zv.detail_gate,
        zoom_source=zv.zoom_source,
        zoom_resample=zv.zoom_resample,
        zoomer_checkpoint=None if zoomer_weights is None else str(zoomer_weights),
        zoomer_width=config.zoomer.width,
        zoomer_depth=config.zoomer.depth,
        zoomer_head=config.zoomer.head,
        inference=inference,
        **_common(config),
    )


def train_zoomvit(
    config: PipelineConfig,
    zoomer_weights: Path,
    out_dir: Path,
    tracking: dict[str, str] | None = None,
    *,
    teacher_weights: Path | str | None = None,
    relevance_dir: Path | str | None = None,
    splits: DecodedSplits | None = None,
    checkpoints: Checkpoints | None = None,
) -> tuple[TrainResult, dict[str, Any] | None]:
    distill = config.zoomvit.distill
    if zoomer_weights is None:
        raise UserError(
            "the zoomvit stage needs the zoomer stage's trained weights: a random Zoomer would zoom into noise"
        )
    _require_teacher_weights(config.zoomvit, teacher_weights)
    highres = config.zoomvit.reads_highres
    operating_point = None
    if config.zoomvit.calibrated:
        from zoomvit.train.calibration import calibrate_operating_point

        operating_point = calibrate_operating_point(config, zoomer_weights, splits=splits)
        op = operating_point
        log.info(
            f"[zoomvit] calibrated on {op['calibration_samples']} held-out samples: alpha {op['alpha']:.4g} "
            f"for {op['target_tokens']:.1f} tokens/img; training alphas {op['train_alpha']}",
        )
    train_ds, streamed = _train_split(config, config.zoomvit.train, splits, highres=highres)
    result = run_training(
        name="zoomvit",
        task=zoomvit_task(config, zoomer_weights, teacher_weights, operating_point=operating_point),
        train=config.zoomvit.train,
        train_ds=_distill_data(train_ds, distill, relevance_dir, "train"),
        val_ds=sample_dataset(config.data, "val", highres=highres, splits=splits),
        out_dir=out_dir,
        tracking=tracking,
        streamed_samples=streamed,
        checkpoints=checkpoints,
    )
    return result, operating_point


def baseline_tasks(config: PipelineConfig, teacher_weights: Path | str | None = None) -> dict[str, ClassifierSpec]:
    """The baseline and its ``others``, by name, each a classifier task with the baseline's recipe."""
    b = config.baseline
    shared = {**distill_spec(config, b.distill, teacher_weights), **_common(config)}
    return {
        name: ClassifierSpec(
            model=m.model,
            model_kwargs=dict(m.model_kwargs),
            pretrained=m.pretrained,
            init_checkpoint=_init_checkpoint(m, teacher_weights),
            **shared,
        )
        for name, m in (("baseline", b), *((m.name, m) for m in b.members))
    }


def baseline_input_sizes(config: PipelineConfig) -> dict[str, int | None]:
    """Each baseline's own input size (None: ``data.image_size``), by name."""
    return {"baseline": None} | {m.name: m.input_size for m in config.baseline.members}


def baseline_task(config: PipelineConfig) -> ClassifierSpec:
    return baseline_tasks(config)["baseline"]


def train_baselines(
    config: PipelineConfig,
    out_dir: Path,
    tracking: dict[str, str] | None = None,
    *,
    teacher_weights: Path | str | None = None,
    relevance_dir: Path | str | None = None,
    splits: DecodedSplits | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict[str, TrainResult]:
    """Train every baseline in turn; the first into ``out_dir``, the others into ``out_dir/<name>`` (their
    checkpoints, when ``checkpoints`` moves them elsewhere, into ``<location>/<name>``).
    Only the first logs its epochs into the stage's MLflow run (the others' results go in the manifest)."""
    distill = config.baseline.distill
    for section in (config.baseline, *config.baseline.members):
        _require_teacher_weights(section, teacher_weights)
    results = {}
    sizes = baseline_input_sizes(config)
    for name, task in baseline_tasks(config, teacher_weights).items():
        train_ds, streamed = _train_split(config, config.baseline.train, splits, input_size=sizes[name])
        results[name] = run_training(
            name=name,
            task=task,
            train=config.baseline.train,
            train_ds=_distill_data(train_ds, distill, relevance_dir, "train"),
            val_ds=sample_dataset(config.data.at_size(sizes[name]), "val", splits=splits),
            out_dir=out_dir if name == "baseline" else out_dir / name,
            tracking=tracking if name == "baseline" else None,
            streamed_samples=streamed,
            checkpoints=checkpoints if checkpoints is None or name == "baseline" else checkpoints.under(name),
        )
    return results
