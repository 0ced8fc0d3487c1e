"""Loading the teacher: a timm model from the hub, or from a local checkpoint without unpickling."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

import zoomvit.models  # noqa: F401  (registers the demo variants)
from zoomvit.models.loading import load_state_dict_file


def load_teacher(
    model: str,
    *,
    pretrained: bool = False,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm classifier in eval mode: hub weights when ``pretrained``, else the checkpoint's."""
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    net = timm.create_model(model, pretrained=pretrained and checkpoint is None, **kwargs)
    if checkpoint is not None:
        net.load_state_dict(load_state_dict_file(checkpoint))
    return net.eval()
