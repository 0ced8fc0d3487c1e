"""Typed, validated configuration: one frozen model per pipeline section.

Unknown keys and wrong types are errors that name the offending key. Sections are independent so a
stage's fingerprint covers exactly the settings it reads.
"""

from zoomvit.config.base import Section
from zoomvit.config.data import DataConfig, DemoDataConfig
from zoomvit.config.pipeline import ConfigError, PipelineConfig, load_config
from zoomvit.config.stages import EvaluateConfig, GatesConfig, RelevanceConfig, TrackingConfig
from zoomvit.config.trained_models import (
    INIT_FROM_TEACHER,
    INPUT_SIZE,
    BaselineConfig,
    BaselineModel,
    TeacherConfig,
    ZoomerConfig,
    ZoomViTConfig,
)
from zoomvit.config.training import DistillConfig, TrainConfig, cached_logits_conflicts

__all__ = [
    "INIT_FROM_TEACHER",
    "INPUT_SIZE",
    "BaselineConfig",
    "BaselineModel",
    "ConfigError",
    "DataConfig",
    "DemoDataConfig",
    "DistillConfig",
    "EvaluateConfig",
    "GatesConfig",
    "PipelineConfig",
    "RelevanceConfig",
    "Section",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "ZoomViTConfig",
    "ZoomerConfig",
    "cached_logits_conflicts",
    "load_config",
]
