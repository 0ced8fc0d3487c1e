"""The stage table: each stage declared once, with what it reads from the config, which stages feed it,
how it runs, and how its output is logged and loaded. Everything else derives from it.

teacher -> relevance -> zoomer -> zoomvit -> evaluate <- baseline   (relevance -> evaluate: maps)

With DeiT distillation, zoomvit and baseline also read the teacher (source=model) or the teacher
logits cached with the relevance maps (source=cache); with ``init_from_teacher`` they start from the
teacher's weights.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoomvit.config import PipelineConfig
from zoomvit.data.relevance_store import GROUP_FILES
from zoomvit.data.shards import is_url
from zoomvit.errors import UserError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from zoomvit.checkpoints import Checkpoints
    from zoomvit.train.data import DecodedSplits
    from zoomvit.train.task_specs import TaskSpec


@dataclass(frozen=True, kw_only=True)
class StageContext:
    config: PipelineConfig
    out_dir: Path
    upstream: dict[str, dict[str, Any]]  # stage name -> that stage's manifest
    fingerprint: str
    tracking: dict[str, str]  # uri + run_id of this stage's MLflow run (for the training workers)
    splits: DecodedSplits | None = None  # the run's shared decoded splits
    checkpoints: Checkpoints | None = None  # where a training stage checkpoints, and its fence; None: out_dir/ray
    # called with the files of each part of the output as it is committed (``StageDef.parts``): an
    # object-store cache uploads them at once, so a rerun on any machine resumes from them
    on_part: Callable[[list[Path]], None] | None = None


@dataclass(frozen=True, kw_only=True)
class StageDef:
    name: str
    sections: tuple[str, ...]  # dotted config paths that the fingerprint covers
    upstream: tuple[tuple[str, str], ...]  # (stage, artifact passed)
    run: Callable[[StageContext], dict[str, Any]]  # returns {"files": {...}, "metrics": {...}}
    extra_upstream: Callable[[PipelineConfig], tuple[tuple[str, str], ...]] | None = None
    # a quality floor on an upstream stage's output: the reason the stage must not run, or None
    gate: Callable[[PipelineConfig, dict[str, dict[str, Any]]], str | None] | None = None
    reads_shards: str | None = None  # the MLflow dataset-input context of the shards it reads, if it reads them
    reads_maps: str | None = None  # the same for the relevance maps
    # its trained model (weights: its output file "weights") as a spec, from the config and the stage's
    # manifest (ZoomViT's calibrated operating point); logged to MLflow and registered
    model_spec: Callable[[PipelineConfig, dict[str, Any]], TaskSpec] | None = None
    classifier: bool = False  # reports a val_top1 that must be clearly above chance
    # a damaged cached output is repaired part by part (the relevance job recomputes only damaged groups)
    repairs_in_place: bool = False
    parts: str | None = None  # a glob of those parts' files, relative to the output (the relevance groups)
    promotes: bool = False  # moves the registry's candidate alias to the upstream models it scored
    parent_artifacts: tuple[str, ...] = ()  # keys of its output files also logged to the pipeline's parent run

    def load_model(self, config: PipelineConfig, weights: Path, manifest: dict[str, Any] | None = None):
        """The stage's trained model, for inference."""
        from zoomvit.train.objectives import load_trained

        if self.model_spec is None:
            raise ValueError(f"stage {self.name!r} trains no model")
        return load_trained(self.model_spec(config, manifest or {}), weights)

    def upstream_for(self, config: PipelineConfig) -> tuple[tuple[str, str], ...]:
        extra = self.extra_upstream(config) if self.extra_upstream else ()
        return self.upstream + tuple(e for e in extra if e[0] not in {u for u, _ in self.upstream})


def _teacher_upstream(section: str) -> Callable[[PipelineConfig], tuple[tuple[str, str], ...]]:
    """What a student stage reads from the teacher side: initial weights and/or distillation targets."""

    def upstream(config: PipelineConfig) -> tuple[tuple[str, str], ...]:
        student = getattr(config, section)
        from_teacher = student.init_from_teacher or any(m.init_from_teacher for m in getattr(student, "others", ()))
        extra = (("teacher", "initial weights"),) if from_teacher else ()
        if student.distill.mode != "none":
            extra += (
                (("teacher", "distillation teacher"),)
                if student.distill.source == "model"
                else (("relevance", "teacher logits"),)
            )
        return extra

    return upstream


def _distill_inputs(ctx: StageContext) -> dict[str, Any]:
    teacher = ctx.upstream.get("teacher")
    relevance = ctx.upstream.get("relevance")
    return {
        "teacher_weights": _upstream_file(ctx, "teacher", "weights")
        if teacher and "weights" in teacher["files"]
        else None,
        "relevance_dir": _upstream_file(ctx, "relevance", "maps") if relevance else None,
    }


class QualityGateFailed(UserError):
    """An upstream model is below its configured quality floor (``gates``)."""


def teacher_gate(config: PipelineConfig, upstream: dict[str, dict[str, Any]]) -> str | None:
    """The teacher must beat its floor on val before its relevance maps teach the Zoomer."""
    top1 = upstream["teacher"].get("metrics", {}).get("val_top1")
    if top1 is None:  # a hub or checkpoint teacher: no val figure from training
        return None
    floor = config.gates.teacher_floor(config.data.num_classes)
    if top1 >= floor:
        return None
    return (
        f"the teacher's val top-1 is {top1:.4f}, below the floor {floor:.4f} "
        f"(chance is {1 / config.data.num_classes:.4f}): "
        "its relevance maps would teach the Zoomer noise. Train a better teacher, or override with "
        "--set gates.teacher_min_top1=0"
    )


def zoomer_gate(config: PipelineConfig, upstream: dict[str, dict[str, Any]]) -> str | None:
    """The Zoomer must follow the teacher's maps before ZoomViT zooms where it points."""
    pearson = upstream["zoomer"].get("metrics", {}).get("val_pearson")
    floor = config.gates.zoomer_min_pearson
    if pearson is None or pearson >= floor:
        return None
    return (
        f"the Zoomer's val Pearson with the teacher maps is {pearson:.4f}, below the floor {floor:.4f}: "
        "ZoomViT would zoom "
        "into noise. Improve the teacher or the Zoomer, or override with --set gates.zoomer_min_pearson=-1"
    )


def _upstream_file(ctx: StageContext, stage: str, name: str) -> Path | str:
    """A file (or directory) of an upstream stage's output: a path, or a URL when the cache is in a bucket."""
    manifest = ctx.upstream[stage]
    if is_url(manifest["out_dir"]):
        base, rel = manifest["out_dir"].rstrip("/"), posixpath.normpath(manifest["files"][name])
        return base if rel == "." else f"{base}/{rel}"
    return Path(manifest["out_dir"]) / manifest["files"][name]


def _train_outputs(result) -> dict[str, Any]:
    return {
        "files": {"weights": result.weights.name},
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "history": result.history,
        "train_samples": result.train_samples,
    }


def run_teacher(ctx: StageContext) -> dict[str, Any]:
    from zoomvit.train.recipes import train_teacher

    result = train_teacher(ctx.config, ctx.out_dir, ctx.tracking, splits=ctx.splits, checkpoints=ctx.checkpoints)
    if result is None:
        t = ctx.config.teacher
        return {
            "files": {},
            "metrics": {},
            "reference": {"model": t.model, "pretrained": t.pretrained, "checkpoint": t.checkpoint},
        }
    return _train_outputs(result)


def run_relevance(ctx: StageContext) -> dict[str, Any]:
    from zoomvit.data.relevance_store import group_path
    from zoomvit.relevance.job import run_relevance_stage, skips_path

    def group_committed(split: str, index: int) -> None:
        if ctx.on_part is not None:
            path = group_path(ctx.out_dir, split, index)
            ctx.on_part([path, skips_path(path)])

    teacher = ctx.upstream["teacher"]
    checkpoint = str(_upstream_file(ctx, "teacher", "weights")) if "weights" in teacher["files"] else None
    manifest = run_relevance_stage(
        data=ctx.config.data,
        teacher=ctx.config.teacher,
        relevance=ctx.config.relevance,
        out_dir=ctx.out_dir,
        checkpoint=checkpoint,
        fingerprint=ctx.fingerprint,
        on_group_committed=group_committed,
    )
    stats = manifest["stats"]
    metrics = {
        "rows": manifest["rows"],
        "images_per_s": stats["images_per_s"],
        "groups_computed": stats["groups_computed"],
        "groups_cached": stats["groups_cached"],
        "skipped": manifest["skips"]["num_skipped"],
    }
    if stats["teacher_acc"] is not None:
        metrics["teacher_acc"] = stats["teacher_acc"]
    metrics.update({f"skipped_{reason}": n for reason, n in manifest["skips"]["counts"].items()})
    return {"files": {"maps": "."}, "metrics": metrics, "skips": manifest["skips"]}


def run_zoomer(ctx: StageContext) -> dict[str, Any]:
    from zoomvit.train.recipes import train_zoomer

    maps = _upstream_file(ctx, "relevance", "maps")
    return _train_outputs(
        train_zoomer(ctx.config, maps, ctx.out_dir, ctx.tracking, splits=ctx.splits, checkpoints=ctx.checkpoints)
    )


def run_zoomvit(ctx: StageContext) -> dict[str, Any]:
    from zoomvit.train.recipes import train_zoomvit

    result, operating_point = train_zoomvit(
        ctx.config,
        _upstream_file(ctx, "zoomer", "weights"),
        ctx.out_dir,
        ctx.tracking,
        splits=ctx.splits,
        checkpoints=ctx.checkpoints,
        **_distill_inputs(ctx),
    )
    outputs = _train_outputs(result)
    if operating_point is not None:
        outputs["calibration"] = operating_point
        outputs["metrics"].update(
            calibrated_alpha=operating_point["alpha"],
            calibration_tokens_per_img=operating_point["calibration_tokens_per_img"],
        )
    return outputs


def run_baseline(ctx: StageContext) -> dict[str, Any]:
    from zoomvit.train.recipes import train_baselines

    results = train_baselines(
        ctx.config, ctx.out_dir, ctx.tracking, splits=ctx.splits, checkpoints=ctx.checkpoints, **_distill_inputs(ctx)
    )
    outputs = _train_outputs(results.pop("baseline"))
    for name, result in results.items():
        outputs["files"][f"weights_{name}"] = str(result.weights.relative_to(ctx.out_dir))
        outputs["metrics"].update({f"{name}_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    return outputs


def _figure_logger(tracking: dict[str, str]) -> Callable[[Any, str], None]:
    """Figures go to the stage's run with ``MlflowClient.log_figure``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking["uri"])

    def log_figure(figure: Any, name: str) -> None:
        try:
            client.log_figure(tracking["run_id"], figure, name)
        except Exception as err:  # noqa: BLE001 - the figure is in the stage's output either way
            log.warning(f"[evaluate] could not log {name} to {tracking['uri']} ({err}); it is in the stage output")

    return log_figure


def run_evaluate(ctx: StageContext) -> dict[str, Any]:
    from zoomvit.evaluation import evaluate_models

    result = evaluate_models(
        ctx.config,
        zoomvit_weights=_upstream_file(ctx, "zoomvit", "weights"),
        baseline_weights={
            ("baseline" if key == "weights" else key.removeprefix("weights_")): _upstream_file(ctx, "baseline", key)
            for key in ctx.upstream["baseline"]["files"]
            if key.startswith("weights")
        },
        relevance_dir=_upstream_file(ctx, "relevance", "maps"),
        out_dir=ctx.out_dir,
        alpha=ctx.upstream["zoomvit"].get("calibration", {}).get("alpha"),
        splits=ctx.splits,
        on_figure=_figure_logger(ctx.tracking),
    )
    metrics: dict[str, Any] = {}
    for row in result["rows"]:
        if row.get("budget") is not None:
            prefix = f"zoomvit_budget_{row['budget']}"
        elif row["model"] != "zoomvit":
            prefix = row["model"]
        else:
            prefix = "zoomvit" if row["headline"] else f"zoomvit_alpha_{row['alpha']}"
        metrics.update(
            {f"{prefix}_{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("alpha", "budget")}
        )
    for part, paired in result["equal_gflops"].items():
        if isinstance(paired, dict):
            key = "zoomvit_minus_baseline_family" + ("" if part == "all" else f"_{part}")
            metrics |= {
                key: paired["delta_top1"],
                f"{key}_ci95_low": paired["delta_top1_ci95"][0],
                f"{key}_ci95_high": paired["delta_top1_ci95"][1],
            }
    files = {"evaluation": "evaluation.json", "frontier": "frontier.png", "by_size": "top1_by_size.png"}
    if (ctx.out_dir / "zoom_layouts.png").exists():
        files["figure"] = "zoom_layouts.png"
    return {"files": files, "metrics": metrics, "rows": result["rows"], "equal_gflops": result["equal_gflops"]}


def zoomer_spec(config: PipelineConfig, manifest: dict[str, Any]) -> TaskSpec:
    from zoomvit.train.recipes import zoomer_task

    return zoomer_task(config)


def zoomvit_spec(config: PipelineConfig, manifest: dict[str, Any]) -> TaskSpec:
    """At the operating point the stage trained for: the calibrated one when there is one."""
    from zoomvit.train.recipes import zoomvit_task

    return zoomvit_task(config, None, inference=True, operating_point=manifest.get("calibration"))


def baseline_spec(config: PipelineConfig, manifest: dict[str, Any]) -> TaskSpec:
    from zoomvit.train.recipes import baseline_task

    return baseline_task(config)


STAGES: dict[str, StageDef] = {
    s.name: s
    for s in (
        StageDef(
            name="teacher",
            sections=("data", "teacher"),
            upstream=(),
            run=run_teacher,
            reads_shards="training",
            classifier=True,
        ),
        StageDef(
            name="relevance",
            sections=("data", "teacher", "relevance"),
            upstream=(("teacher", "teacher weights"),),
            run=run_relevance,
            gate=teacher_gate,
            reads_shards="attribution",
            repairs_in_place=True,
            parts=GROUP_FILES,
        ),
        StageDef(
            name="zoomer",
            sections=("data", "zoomer", "zoomvit.model", "zoomvit.model_kwargs"),
            upstream=(("relevance", "relevance maps"),),
            run=run_zoomer,
            reads_shards="training",
            reads_maps="targets",
            model_spec=zoomer_spec,
        ),
        StageDef(
            name="zoomvit",
            sections=("data", "zoomer", "zoomvit"),
            upstream=(("zoomer", "frozen Zoomer"),),
            extra_upstream=_teacher_upstream("zoomvit"),
            run=run_zoomvit,
            gate=zoomer_gate,
            reads_shards="training",
            model_spec=zoomvit_spec,
            classifier=True,
        ),
        StageDef(
            name="baseline",
            sections=("data", "baseline"),
            upstream=(),
            extra_upstream=_teacher_upstream("baseline"),
            run=run_baseline,
            reads_shards="training",
            model_spec=baseline_spec,
            classifier=True,
        ),
        StageDef(
            name="evaluate",
            sections=("data", "zoomvit", "baseline", "evaluate"),
            upstream=(("zoomvit", "ZoomViT weights"), ("baseline", "baseline weights"), ("relevance", "val maps")),
            run=run_evaluate,
            reads_maps="figures",
            promotes=True,
            parent_artifacts=("evaluation", "frontier", "by_size"),  # the run's headline evidence
        ),
    )
}
ORDER: tuple[str, ...] = tuple(STAGES)
