"""Segmentation engines: one protocol, several implementations.

An engine splits the work in two: `embed(image)` is the expensive, cacheable part (the image
encoder for SAM), `predict(embedding, prompt, prev_logits)` the cheap per-click part.

Shapes: images are `(H, W, 3) uint8 RGB`; masks are `(K, H, W) bool` in the image's pixels;
`scores` is `(K,) float32`; `low_res_logits` is `(K, 256, 256) float32` (SAM) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from sam_backend.config import Settings
    from sam_backend.prompts import ObjectPrompt


class EngineError(RuntimeError):
    """The engine cannot be built or cannot run (missing checkpoint, wrong weights, bad device)."""


@dataclass(frozen=True)
class Embedding:
    """An engine's per-image state; `nbytes` is what it costs the cache."""

    engine_id: str
    image_size: tuple[int, int]  # (height, width) in pixels
    data: Any
    nbytes: int


@dataclass(frozen=True)
class MaskPrediction:
    """Candidate masks for one object, best first is not implied: use `best`."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray | None

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.dtype != np.bool_:
            raise ValueError(f"masks: expected (K, H, W) bool, got {self.masks.shape} {self.masks.dtype}")
        if self.scores.shape != (self.masks.shape[0],):
            raise ValueError(f"scores: expected ({self.masks.shape[0]},), got {self.scores.shape}")

    @property
    def best(self) -> int:
        """Index of the mask with the highest score."""
        return int(np.argmax(self.scores))


class Engine(Protocol):
    """What the backend needs from a segmentation engine."""

    engine_id: str

    def embed(self, image: np.ndarray) -> Embedding:
        """Encode an `(H, W, 3) uint8 RGB` image once."""
        ...

    def predict(
        self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
    ) -> MaskPrediction:
        """Masks for one object; `prev_logits` `(256, 256) float32` refines an earlier answer."""
        ...


def make_engine(settings: Settings) -> Engine:
    """Build the engine the settings name (loads weights: call it off the request path)."""
    if settings.engine == "grabcut":
        from sam_backend.engines.grabcut import GrabCutEngine

        return GrabCutEngine()
    from sam_backend.engines.sam import SamEngine

    return SamEngine.from_settings(settings)
