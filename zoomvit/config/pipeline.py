"""The whole pipeline's config: every section, the checks across sections, and loading it from YAML."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from zoomvit.config.base import Section
from zoomvit.config.data import DataConfig
from zoomvit.config.stages import EvaluateConfig, GatesConfig, RelevanceConfig, TrackingConfig
from zoomvit.config.trained_models import BaselineConfig, TeacherConfig, ZoomerConfig, ZoomViTConfig
from zoomvit.errors import UserError


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
        if zv.zoom_cells is not None:
            if self.evaluate.alphas or self.evaluate.budgets:
                raise ValueError(
                    "zoomvit.zoom_cells trains at one fixed number of zoomed cells: leave evaluate.alphas and "
                    "evaluate.budgets empty"
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
