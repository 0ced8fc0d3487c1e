"""The sections of the stages that train nothing: relevance, evaluation, quality gates, MLflow tracking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from zoomvit.config.base import Section


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
