"""`EngineId`: what an engine is, as one value with its own parse and format.

The text form names what an embedding is valid for and keys every cache, graph file and verdict:
`<family>/<model>/<weights>/<precision>`, e.g. `sam/vit_t/6dbb90523a35/bf16`, `sam2/sam2.1_hiera_tiny/…/fp32`,
`sam/vit_b/random0/fp32` (seeded random weights); GrabCut has no weights or precision:
`grabcut/<max side>/<iterations>`.
The encoder path (`eager`, `onnx`, `aoti`) is part of the value but not of the text: the paths' embeddings agree
with fp32 eager ones (mean mask IoU ≥ 0.99, `encoder_choice`), so one image is encoded once whichever path runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineId:
    """`family` (`sam`, `sam2`, `grabcut`), `model` (`vit_b`, `vit_t`, `sam2.1_hiera_tiny`, …), `weights` (the
    checkpoint's digest, first 12 hex digits, or `random<seed>`), `precision` (`fp32`, `bf16`; empty where none) and
    `encoder` (the image encoder's path)."""

    family: str
    model: str
    weights: str = "unknown"
    precision: str = ""
    encoder: str = "eager"

    @classmethod
    def parse(cls, text: str) -> EngineId:
        """The value of a text `format` gave (missing trailing parts: `unknown` weights, no precision)."""
        parts = str(text).split("/")
        return cls(parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "unknown",
                   "/".join(parts[3:]))

    @classmethod
    def of(cls, family: str, weights_id: str, precision: str) -> EngineId:
        """From a loader's `weights_id` (`<model>/<weights>`) and the precision."""
        model, _, weights = weights_id.partition("/")
        return cls(family, model, weights or "unknown", precision)

    @functools.cached_property
    def _text(self) -> str:
        """The text form (computed once: it keys every click's cache lookups)."""
        return "/".join(p for p in (self.family, self.model, self.weights, self.precision) if p)

    def format(self) -> str:
        return self._text

    __str__ = format

    @property
    def weights_key(self) -> str:
        """`<family>/<model>/<weights>`: what learnt from these weights stays valid for, whatever the precision."""
        return f"{self.family}/{self.model}/{self.weights}"
