"""What a training worker builds, as typed, frozen specs: one per task, told apart by ``task``.

The recipes (``train/recipes.py``) fill every field from the validated pipeline config; workers read
fields, never defaults, so a renamed or misspelt option fails validation here instead of silently
falling back. Specs are pydantic models: they pickle across Ray's process boundary.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from zoomvit.config import DistillConfig, Section


class _Labels(Section):
    num_classes: int = Field(ge=2)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def for_inference(self):
        """The architecture alone, to load trained weights into."""
        return self


class TeacherRef(Section):
    """How a worker rebuilds the teacher for ``distill.source=model``."""

    model: str
    pretrained: bool
    checkpoint: str | None
    num_classes: int
    model_kwargs: dict[str, Any]


class ClassifierSpec(_Labels):
    """A timm classifier: the teacher, the baseline and its family."""

    task: Literal["classifier"] = "classifier"
    model: str
    model_kwargs: dict[str, Any] = {}
    pretrained: bool = False
    init_checkpoint: str | None = None
    distill: DistillConfig = DistillConfig()
    distill_teacher: TeacherRef | None = None

    def for_inference(self):
        """The architecture alone, to load trained weights into."""
        return self.model_copy(update={"pretrained": False, "init_checkpoint": None})


class ZoomViTSpec(ClassifierSpec):
    """ZoomViT with its frozen Zoomer; training draws each image's alpha from ``train_alpha``, or its
    token budget from ``train_budget`` (``num_cells`` + 3 per zoomed cell)."""

    task: Literal["zoomvit"] = "zoomvit"
    alpha: float
    train_alpha: tuple[float, float]
    train_budget: tuple[int, int] | None
    num_cells: int
    coarse_alpha: float | None
    keep_rate: float
    token_budget: int | None
    zoom_cells: int | None = None
    merge: Literal["replace", "add", "fold"] = "replace"
    detail_gate: float | None = None
    zoom_source: Literal["upsample", "highres"]
    zoom_resample: Literal["nearest", "bilinear"]
    zoomer_checkpoint: str | None
    zoomer_width: int
    zoomer_depth: int
    zoomer_head: Literal["global", "local"]
    inference: bool = False

    def for_inference(self):
        return self.model_copy(update={"pretrained": False, "init_checkpoint": None, "inference": True})


class ZoomerSpec(_Labels):
    """The Zoomer regressing the teacher's maps on ZoomViT's grid."""

    task: Literal["zoomer"] = "zoomer"
    grid: tuple[int, int]
    width: int
    depth: int
    head: Literal["global", "local"]
    loss: Literal["mse", "bce"]
    topk_fraction: float


TaskSpec = Annotated[ClassifierSpec | ZoomViTSpec | ZoomerSpec, Field(discriminator="task")]
