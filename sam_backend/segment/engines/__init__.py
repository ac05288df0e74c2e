"""Segmentation engines: one protocol, several implementations.

An engine splits the work in two: `embed(image)` is the expensive, cacheable part (the image
encoder for SAM), `predict(embedding, prompt, prev_logits)` the cheap per-click part.

What an embedding holds (`Embedding`): the engine id that made it, the image's `ImageSize`, and
named arrays (`features`) that are everything `predict` needs, nothing else. SAM keeps
`image_embed` `(1, 256, 64, 64) float32`; SAM 2.1 adds `high_res_0` `(1, 32, 256, 256)` and `high_res_1`
`(1, 64, 128, 128)`; GrabCut keeps the downscaled `image` `(h, w, 3) uint8 BGR`.
`Engine.dump` / `Engine.load` turn an embedding into bytes and back (arrays on the CPU, dtype kept,
no pickle: see `sam_backend.segment.embedding`), so that an embedding can live outside the process.

Shapes: images are `(H, W, 3) uint8 RGB`; masks are `(K, H, W) bool` in the image's pixels;
`scores` is `(K,) float32`; `low_res_logits` is `(K, 256, 256) float32` (SAM) or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from sam_backend.segment.embedding import Embedding
from sam_backend.segment.engines.ids import EngineId

if TYPE_CHECKING:
    from sam_backend.segment.prompts import ObjectPrompt

__all__ = ["Adaptable", "Embedding", "EncoderChoosing", "Engine", "EngineError", "EngineId", "MaskPrediction",
           "NamesPaths", "PathChoosing", "check_image", "paths_of"]

class EngineError(RuntimeError):
    """The engine cannot be built or cannot run (missing checkpoint, wrong weights, bad device)."""


def check_image(image: np.ndarray) -> None:
    """Raise `EngineError` unless `image` is `(H, W, 3) uint8 RGB`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise EngineError(f"image: expected (H, W, 3) uint8 RGB, got {shape} {getattr(image, 'dtype', type(image))}")


@dataclass(frozen=True)
class MaskPrediction:
    """Candidate masks for one object, best first is not implied: use `best` and `best_mask`.

    An engine may give the full-resolution masks (`masks`) or, to do only the work the answer needs,
    `upsample(i) -> (H, W) bool` for candidate `i`: then only the chosen mask is brought to full resolution
    (`best_mask`), and `masks` computes all of them on first use.
    """

    masks_: np.ndarray | None
    scores: np.ndarray
    low_res_logits: np.ndarray | None
    upsample: Callable[[int], np.ndarray] | None = field(default=None, repr=False, compare=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.masks_ is None:
            if self.upsample is None:
                raise ValueError("masks: expected the masks or an upsample function, got neither")
            return
        if self.masks_.ndim != 3 or self.masks_.dtype != np.bool_:
            raise ValueError(f"masks: expected (K, H, W) bool, got {self.masks_.shape} {self.masks_.dtype}")
        if self.scores.shape != (self.masks_.shape[0],):
            raise ValueError(f"scores: expected ({self.masks_.shape[0]},), got {self.scores.shape}")

    @property
    def best(self) -> int:
        """Index of the mask with the highest score."""
        return int(np.argmax(self.scores))

    def mask(self, i: int) -> np.ndarray:
        """Candidate `i` as `(H, W) bool` (upsampled once, on demand)."""
        if self.masks_ is not None:
            return self.masks_[i]
        if i not in self._cache:
            self._cache[i] = self.upsample(i)
        return self._cache[i]

    @property
    def best_mask(self) -> np.ndarray:
        """The highest-scoring mask, `(H, W) bool`."""
        return self.mask(self.best)

    @property
    def masks(self) -> np.ndarray:
        """All candidates, `(K, H, W) bool`."""
        if self.masks_ is not None:
            return self.masks_
        return np.stack([self.mask(i) for i in range(len(self.scores))])


@runtime_checkable
class Engine(Protocol):
    """What the backend needs from a segmentation engine: it encodes and decodes. What else an engine can do, it
    declares by the protocols below; callers ask `isinstance(engine, <protocol>)`, never `hasattr`."""

    engine_id: str  # `id`'s text
    id: EngineId

    def embed(self, image: np.ndarray) -> Embedding:
        """Encode an `(H, W, 3) uint8 RGB` image once."""
        ...

    def predict(
        self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
    ) -> MaskPrediction:
        """Masks for one object; `prev_logits` `(256, 256) float32` refines an earlier answer."""
        ...

    def dump(self, embedding: Embedding, compact: bool = False) -> bytes:
        """The embedding as bytes (see `sam_backend.segment.embedding`); `compact` may store features in less
        precision (float16) for a shared store."""
        ...

    def load(self, data: bytes) -> Embedding:
        """An embedding from `dump`'s bytes, ready for `predict`; `EmbeddingFormatError` if they are not one."""
        ...


@runtime_checkable
class PathChoosing(Protocol):
    """Its encoder precision and its decoder path can be chosen (`SAM_PRECISION`, `SAM_DECODER`): the torch engines."""

    device: Any
    precision: str
    bf16_native: bool
    architecture_name: str
    decoder_kind: str

    def with_precision(self, precision: str) -> Any:
        """The same weights, encoding in `precision` (`fp32`, `bf16`)."""
        ...

    def use_decoder(self, kind: str = "auto", cache: Path | None = None, check_images: Path | None = None) -> str:
        """Run clicks through the `kind` decoder where it agrees with eager; returns the kind in use."""
        ...

    def predict_with(self, decoder: Any, embedding: Embedding, prompt: ObjectPrompt,
                     prev_logits: np.ndarray | None = None) -> MaskPrediction:
        """Masks for one object through `decoder` (None: eager)."""
        ...

    def decoder_graph(self) -> tuple[Any, dict[str, Any], Embedding]:
        """The decoder as one graph module, example inputs, an embedding of random features."""
        ...


@runtime_checkable
class EncoderChoosing(Protocol):
    """Its image encoder's path can be chosen (`SAM_ENCODER`: `eager`, `onnx`, `aoti`)."""

    encoder_kind: str
    encoder_precision: str
    encoder_tuning: Any  # the background measurement's thread while it runs, else None

    def with_encoder(self, encoder: Any) -> Any:
        """The same weights with another encoder runner (None: eager)."""
        ...

    def use_encoder(self, encoder: Any) -> None:
        """Switch this engine's encodes to `encoder` (None: eager)."""
        ...


@runtime_checkable
class Adaptable(Protocol):
    """Its mask decoder can be swapped for one learnt from accepted masks (`SAM_ADAPT`, `evaluate --adapt-on`)."""

    adapter_version: str | None  # None: the decoder as released
    answers: Any  # an adapted engine's clicks by the decoder that answered (`Counter`), else None
    base_mask_decoder: Any

    def with_mask_decoder(self, decoder: Any, version: str | None, fallback: bool = True) -> Any:
        """The same engine (same `engine_id`) with another mask decoder."""
        ...


@runtime_checkable
class NamesPaths(Protocol):
    """Says which image-encoder and decoder paths it runs (`eager`, `onnx`, `aoti`, `compile`): the torch engines
    and the torch-free start (`onnx_sam`)."""

    encoder_kind: str
    decoder_kind: str


def paths_of(engine: Engine) -> tuple[str, str]:
    """`(encoder path, decoder path)` an engine runs now; `eager` for an engine that does not say."""
    return (engine.encoder_kind, engine.decoder_kind) if isinstance(engine, NamesPaths) else ("eager", "eager")


STROKE_LOGIT = 8.0  # a brush stroke as a mask prompt: +8 where it lies, -8 elsewhere (SAM logits scale)


def stroke_logits(stroke: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(H, W) bool` stroke, already placed in a model's input frame, → `size` `(h, w) float32` logits; any
    stroke pixel in a low-res cell makes it positive, so a thin scribble survives the downsampling."""
    import cv2

    cover = cv2.resize(stroke.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return np.where(cover > 0, STROKE_LOGIT, -STROKE_LOGIT).astype(np.float32)
