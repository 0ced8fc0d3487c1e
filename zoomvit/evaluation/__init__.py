"""The evaluate stage (:mod:`.stage`), its statistics (:mod:`.stats`), zoom controls (:mod:`.controls`)
and figures (:mod:`.figures`)."""

from zoomvit.evaluation.controls import CONTROLS, control_scores, matched_scores
from zoomvit.evaluation.stage import evaluate_models
from zoomvit.evaluation.stats import bootstrap_ci, paired_delta_at_equal_gflops

__all__ = [
    "CONTROLS",
    "bootstrap_ci",
    "control_scores",
    "evaluate_models",
    "matched_scores",
    "paired_delta_at_equal_gflops",
]
