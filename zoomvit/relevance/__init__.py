"""Teacher relevance maps (gradient-weighted attention rollout and baselines) on timm ViTs."""

from zoomvit.relevance.attribution import METHODS, RelevanceResult, attention_probes, normalize_maps, relevance_maps

__all__ = ["METHODS", "RelevanceResult", "attention_probes", "normalize_maps", "relevance_maps"]
