"""Where a training stage's checkpoints go, and the fence its workers check before writing one.

The stage cache decides both (a directory or a bucket prefix per cache entry; the object-store cache's
claim is the fence), the training loop obeys them: this value is what the two share, so neither
imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Checkpoints:
    """Where a training run's checkpoints go (a path or fsspec URL; None: ``out_dir/ray``), and the fence
    its workers call before they write one: it raises once the stage's claim on the cache entry was
    taken over by another driver (:mod:`zoomvit.pipeline.cache.claims`), so a stalled holder stops."""

    location: str | None = None
    fence: Callable[[], None] | None = None

    def under(self, name: str) -> Checkpoints:
        return replace(self, location=None if self.location is None else f"{self.location}/{name}")
