"""Loading the teacher: a timm model from the hub, or from a local checkpoint without unpickling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

import zoomvit.models  # noqa: F401  (registers the demo variants)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file read with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return state


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
