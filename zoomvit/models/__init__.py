"""Models: the Zoomer, the zoom tokenizer and ZoomViT (registered in timm), plus FLOP counting.

Importing this package registers the ``zoomvit_*`` and ``vit_*`` test/demo variants with timm, so
``timm.create_model("zoomvit_small_patch16_224")`` works afterwards.
"""

from zoomvit.models import baseline as _baseline  # noqa: F401  (registers the baseline variants)
from zoomvit.models.flops import FlopReport, count_flops, zoomvit_flops
from zoomvit.models.loading import adapt_pos_embed, load_pretrained
from zoomvit.models.tokenizer import COARSE, NORMAL, ZOOM, TokenLayout, ZoomConfig
from zoomvit.models.zoomer import Zoomer
from zoomvit.models.zoomvit import ZoomTokens, ZoomViT, load_backbone_state_dict

__all__ = [
    "COARSE",
    "NORMAL",
    "ZOOM",
    "FlopReport",
    "TokenLayout",
    "ZoomConfig",
    "ZoomTokens",
    "ZoomViT",
    "Zoomer",
    "adapt_pos_embed",
    "count_flops",
    "load_backbone_state_dict",
    "load_pretrained",
    "zoomvit_flops",
]
