"""The training stages (teacher, Zoomer, ZoomViT, baseline) from the pipeline config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm

from zoomvit.config import PipelineConfig
from zoomvit.train.data import sample_dataset, with_maps
from zoomvit.train.trainer import TrainResult, run_training


def _common(config: PipelineConfig) -> dict[str, Any]:
    return {"num_classes": config.data.num_classes, "mean": list(config.data.mean), "std": list(config.data.std)}


def train_teacher(config: PipelineConfig, out_dir: Path, tracking: dict[str, str] | None = None) -> TrainResult | None:
    """Train the teacher ViT on the shards; None when the config names a pretrained teacher."""
    teacher = config.teacher
    if teacher.pretrained or teacher.checkpoint:
        return None
    if teacher.train is None:
        raise ValueError("teacher: set pretrained=true, a checkpoint, or a train section")
    task = {"kind": "classifier", "model": teacher.model, "model_kwargs": dict(teacher.model_kwargs), **_common(config)}
    return run_training(
        name="teacher",
        task=task,
        train=teacher.train,
        train_ds=sample_dataset(config.data, "train"),
        val_ds=sample_dataset(config.data, "val"),
        out_dir=out_dir,
        tracking=tracking,
    )


def zoomvit_grid(config: PipelineConfig) -> tuple[int, int]:
    import zoomvit.models  # noqa: F401

    model = timm.create_model(config.zoomvit.model, with_zoomer=False, num_classes=config.data.num_classes, **config.zoomvit.model_kwargs)
    return tuple(model.grid)


def train_zoomer(config: PipelineConfig, relevance_dir: Path, out_dir: Path, tracking: dict[str, str] | None = None) -> TrainResult:
    grid = zoomvit_grid(config)
    z = config.zoomer
    task = {"kind": "zoomer", "grid": list(grid), "width": z.width, "depth": z.depth, "loss": z.loss, "topk_fraction": z.topk_fraction, **_common(config)}
    return run_training(
        name="zoomer",
        task=task,
        train=z.train,
        train_ds=with_maps(sample_dataset(config.data, "train"), relevance_dir, "train", grid),
        val_ds=with_maps(sample_dataset(config.data, "val"), relevance_dir, "val", grid),
        out_dir=out_dir,
        tracking=tracking,
    )


def zoomvit_task(config: PipelineConfig, zoomer_weights: Path | str | None) -> dict[str, Any]:
    zv = config.zoomvit
    return {
        "kind": "zoomvit",
        "model": zv.model,
        "model_kwargs": dict(zv.model_kwargs),
        "pretrained": zv.pretrained,
        "alpha": zv.alpha,
        "train_alpha": list(zv.train_alpha),
        "coarse_alpha": zv.coarse_alpha,
        "keep_rate": zv.keep_rate,
        "token_budget": zv.token_budget,
        "zoomer_checkpoint": None if zoomer_weights is None else str(zoomer_weights),
        "zoomer_width": config.zoomer.width,
        "zoomer_depth": config.zoomer.depth,
        **_common(config),
    }


def train_zoomvit(config: PipelineConfig, zoomer_weights: Path, out_dir: Path, tracking: dict[str, str] | None = None) -> TrainResult:
    return run_training(
        name="zoomvit",
        task=zoomvit_task(config, zoomer_weights),
        train=config.zoomvit.train,
        train_ds=sample_dataset(config.data, "train"),
        val_ds=sample_dataset(config.data, "val"),
        out_dir=out_dir,
        tracking=tracking,
    )


def baseline_task(config: PipelineConfig) -> dict[str, Any]:
    b = config.baseline
    return {"kind": "classifier", "model": b.model, "model_kwargs": dict(b.model_kwargs), "pretrained": b.pretrained, **_common(config)}


def train_baseline(config: PipelineConfig, out_dir: Path, tracking: dict[str, str] | None = None) -> TrainResult:
    return run_training(
        name="baseline",
        task=baseline_task(config),
        train=config.baseline.train,
        train_ds=sample_dataset(config.data, "train"),
        val_ds=sample_dataset(config.data, "val"),
        out_dir=out_dir,
        tracking=tracking,
    )
