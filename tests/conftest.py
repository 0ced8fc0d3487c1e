import os

os.environ.setdefault("RAY_ACCEPT_CALLABLE_OR_CLASS_AS_CONSTRUCTOR", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import zoomvit.models  # noqa: F401  (registers the timm variants)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
