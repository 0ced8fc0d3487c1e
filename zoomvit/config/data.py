"""The data section: where the shards are, how images become tensors, and the demo data set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from zoomvit.config.base import Section


class DemoDataConfig(Section):
    """Generate the demo dataset into ``data.root`` when its shards are missing.

    ``preset``: ``default`` (small white digits among dim clutter), ``hard`` (smaller digits, clutter
    of the digit's size in saturated colours up to its brightness, photo backgrounds) or ``fine``
    (the class only in detail above a half-size view's Nyquist frequency, inside a small framed
    panel; store it at twice the model's input: ``image_size: 128`` for a 64 px model), ``shapes`` and
    ``shapes2`` (the class a small shape at any offset whose detail only the stored pixels hold; two
    generators, :mod:`zoomvit.data.shapes` and :mod:`zoomvit.data.shapes2`; also ``image_size: 128``);
    ``difficulty`` (0..1) sets the digits' knob directly and overrides the preset's."""

    train: int = Field(2048, ge=0)
    val: int = Field(512, ge=0)
    image_size: int = Field(64, ge=16)
    seed: int = 0
    samples_per_shard: int = Field(256, ge=1)
    photo_clutter: bool = False
    preset: Literal["default", "hard", "fine", "shapes", "shapes2"] = "default"
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
