"""What the torch engines (SAM, SAM 2.1) share: device and precision choice, the checkpoint loader, random
weights for timing, another precision of the same weights, and the byte form of their embeddings."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from sam_backend.segment.cpu import cpu_info, precision_on_cpu
from sam_backend.segment.embedding import Embedding, pack, unpack
from sam_backend.segment.engines import EngineError, MaskPrediction
from sam_backend.segment.engines.fast_decoder import FastDecoder, build_fast_decoder, resolve_decoder
from sam_backend.segment.engines.fast_encoder import FastEncoder
from sam_backend.segment.engines.graph_files import (
    MIN_DECODER_IOU,
    decoder_file,
    decoder_verdict_file,
    read_decoder_verdict,
    write_decoder_verdict,
)
from sam_backend.segment.engines.ids import EngineId

if TYPE_CHECKING:
    from sam_backend.segment.prompts import ObjectPrompt

T = TypeVar("T", bound="TorchEngine")
log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` → cuda, then mps, then cpu; a named device must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("SAM_DEVICE=cuda but torch sees no CUDA device; use SAM_DEVICE=auto or cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EngineError("SAM_DEVICE=mps but MPS is not available; use SAM_DEVICE=auto or cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True where the CPU has AVX-512 BF16 or AMX instructions (bf16 matmul at full speed)."""
    return cpu_info().native_bf16


def bf16_native(device: torch.device) -> bool:
    """True where `device` runs bf16 matmuls in hardware (a bf16 GPU; a CPU with AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → `bf16` where the device runs it natively (`bf16_native`), else `fp32`."""
    if device.type == "cpu" or precision != "auto":
        return precision_on_cpu(precision)
    return "bf16" if bf16_native(device) else "fp32"


class TorchEngine:
    """Base of the torch engines: `model`, `device`, `precision`, `engine_id`; subclasses give `build`."""

    model: torch.nn.Module
    device: torch.device
    _identity: EngineId  # its family, model, weights and precision (`engine_id` is its text)
    fast_decoder: FastDecoder | None = None  # None: the eager prompt encoder + mask decoder
    fast_encoder: FastEncoder | None = None  # None: the eager image encoder (see `segment.engines.encoder_choice`)
    encoder_tuning: threading.Thread | None = None  # the background measurement of the encoder paths, if one runs

    @classmethod
    def build(cls, model_type: str) -> torch.nn.Module:
        """An official architecture with random weights."""
        raise NotImplementedError

    @classmethod
    def random(cls: type[T], model_type: str, *, device: str = "auto", precision: str = "auto", seed: int = 0) -> T:
        """An official architecture with seeded random weights (for timing; its masks mean nothing)."""
        torch.manual_seed(seed)
        model = cls.build(model_type)
        dev = resolve_device(device)
        return cls(model, device=dev, precision=resolve_precision(precision, dev),
                   weights_id=f"{model_type}/random{seed}")

    @property
    def id(self) -> EngineId:
        """What this engine is, with the encoder path it runs now (`encoder_kind`)."""
        return replace(self._identity, encoder=self.encoder_kind)

    @property
    def engine_id(self) -> str:
        """`id`'s text: what embeddings, graphs and verdicts are keyed by (the encoder path is not in it)."""
        return self._identity.format()

    @property
    def precision(self) -> str:
        """The image encoder's precision (`fp32`, `bf16`)."""
        return self._identity.precision

    @property
    def architecture_name(self) -> str:
        """The model the weights hold (`vit_b`, `vit_t`, `sam2.1_hiera_tiny`, …)."""
        return self._identity.model

    @property
    def bf16_native(self) -> bool:
        """Whether this engine's device runs bf16 natively (else a bf16 encode is emulated: minutes on a CPU)."""
        return bf16_native(self.device)

    def clone(self: T) -> T:
        """A copy sharing the weights and the model (the one way an engine is copied: `with_precision`,
        `with_encoder`, `SamEngine.with_mask_decoder`); change the copy's attributes, never the shared model's."""
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        return other

    def with_precision(self: T, precision: str) -> T:
        """The same weights with another encoder precision (`fp32` or `bf16`)."""
        other = self.clone()
        other._identity = replace(self._identity, precision=resolve_precision(precision, self.device))
        return other

    def with_encoder(self: T, encoder: FastEncoder | None) -> T:
        """The same weights with another image-encoder runner (None: eager)."""
        other = self.clone()
        other.use_encoder(encoder)
        return other

    def use_encoder(self, encoder: FastEncoder | None) -> None:
        """Run this engine's image encodes on `encoder` (None: eager) from now on; an encode already running ends
        on the path it began with (`embed` reads the path once). The background measurement switches a live engine
        with this."""
        self.fast_encoder = encoder

    @property
    def encoder_kind(self) -> str:
        """`onnx`, `aoti` or `eager`: the image-encoder path `embed` runs."""
        encoder = self.fast_encoder
        return encoder.kind if encoder is not None else "eager"

    @property
    def encoder_precision(self) -> str:
        """The precision the image encoder computes in (an `onnx` graph is fp32 whatever the engine's)."""
        encoder = self.fast_encoder
        return encoder.precision if encoder is not None else self.precision

    @property
    def decoder_kind(self) -> str:
        """`onnx`, `compile` or `eager`: the decoder path `predict` runs."""
        return self.fast_decoder.kind if self.fast_decoder is not None else "eager"

    def decoder_graph(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Embedding]:
        """`(graph module, example inputs by name, an embedding of random features)`; see `fast_decoder`."""
        raise NotImplementedError

    def decoder_cache(self, checkpoint: Path) -> Path:
        """Where the exported decoder graph of this engine's weights is kept: next to `checkpoint`, keyed by
        the weights' digest (in the engine id) and the graph version."""
        return decoder_file(checkpoint, self._identity.weights)

    def use_decoder(self, kind: str = "auto", cache: Path | None = None, check_images: Path | None = None) -> str:
        """Run clicks through the `kind` decoder (`auto`, `onnx`, `compile`, `eager`); returns the kind in use.

        A fast kind is used only where its masks agree with eager ones (IoU ≥ 0.999 for every candidate of a
        table of prompts, on random features, else on encoded check images: `decoder_agreement`); where it cannot
        be built or does not agree, a warning says why and eager stays. An ONNX graph's verdict is kept beside it
        (`<graph>.json`, tied to the graph's SHA-256): a restart reuses an accepted graph without checking it
        again and does not export a refused one again."""
        kind = resolve_decoder(kind, self.device)
        self.fast_decoder = None
        if kind == "eager":
            return "eager"
        verdict = read_decoder_verdict(cache, self.engine_id) if kind == "onnx" else None
        if verdict is not None and not verdict["accepted"]:
            log.warning("SAM_DECODER=%s was refused for these weights on this machine (masks IoU %.4f < %.3f, "
                        "verdict in %s); clicks use the eager decoder", kind, verdict["iou"], MIN_DECODER_IOU,
                        decoder_verdict_file(cache))
            return "eager"
        try:
            graph, example, embedding = self.decoder_graph()
            candidate = build_fast_decoder(kind, graph, example, cache=cache)
            if verdict is not None:
                self.fast_decoder = candidate
                log.info("clicks use the %s decoder (masks IoU %.4f against eager, verdict in %s)", kind,
                         verdict["iou"], decoder_verdict_file(cache))
                return kind
            worst = self.decoder_agreement(candidate, embedding, check_images)
            if worst < MIN_DECODER_IOU and getattr(candidate, "from_cache", False):
                log.warning("the cached decoder graph %s gives other masks than these weights (IoU %.4f); "
                            "exporting it again", cache, worst)  # a stale or tampered cached export
                cache.unlink(missing_ok=True)
                candidate = build_fast_decoder(kind, graph, example, cache=cache)
                worst = self.decoder_agreement(candidate, embedding, check_images)
        except Exception as exc:  # onnxruntime missing, an exporter or compiler failure: eager still works
            log.warning("SAM_DECODER=%s cannot run here (%s: %s); clicks use the eager decoder", kind,
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            return "eager"
        if kind == "onnx":
            write_decoder_verdict(cache, self.engine_id, worst)
        if worst < MIN_DECODER_IOU:
            log.warning("SAM_DECODER=%s masks differ from eager ones (IoU %.4f < %.3f); clicks use the eager "
                        "decoder", kind, worst, MIN_DECODER_IOU)
            return "eager"
        self.fast_decoder = candidate
        log.info("clicks use the %s decoder (masks IoU %.4f against eager)", kind, worst)
        return kind

    def decoder_agreement(self, candidate: FastDecoder, embedding: Embedding, check_images: Path | None = None
                          ) -> float:
        """`compare_decoder` on `embedding` (random features: no encode); where that falls below `MIN_DECODER_IOU`, the
        lowest verdict of the same table on this engine's own encodings of the check images (`SAM_CHECK_IMAGES`'
        photos, else the sample image). Trained weights put many low-res logits of random features right at the
        threshold, where float rounding flips pixels (MobileSAM's real weights: IoU 0.9972 on random features,
        1.0 on encoded photos), so images' features decide."""
        worst = self.compare_decoder(candidate, embedding)
        if worst >= MIN_DECODER_IOU:
            return worst
        from sam_backend.segment.samples import check_images as load_check_images

        samples = self.__dict__.setdefault("_encoded_samples", {})  # a re-export is checked on the same encodes
        key = (self.engine_id, check_images)
        if key not in samples:
            samples[key] = [self.embed(image) for image in load_check_images(check_images)]
        real = min(self.compare_decoder(candidate, e) for e in samples[key])
        log.info("decoder check: IoU %.4f on random features, %.4f on %d encoded check images", worst, real,
                 len(samples[key]))
        return real

    def compare_decoder(self, candidate: FastDecoder, embedding: Embedding) -> float:
        """The lowest IoU between `candidate`'s low-res masks and eager ones, over every candidate mask of
        `bench_prompts` (first clicks and clicks seeded with the previous logits)."""
        from sam_backend.segment.samples import bench_prompts
        from sam_backend.segment.simulator import iou

        worst = 1.0
        for prompt in bench_prompts(*embedding.image_size):
            first = self.predict_with(None, embedding, prompt)
            seeded = first.low_res_logits[first.best]
            for prev, slow in ((None, first), (seeded, self.predict_with(None, embedding, prompt, seeded))):
                fast = self.predict_with(candidate, embedding, prompt, prev)
                for a, b in zip(slow.low_res_logits, fast.low_res_logits, strict=True):
                    worst = min(worst, iou(a > 0, b > 0))
                if slow.best != fast.best:
                    worst = min(worst, iou(slow.mask(slow.best), fast.mask(fast.best)))
        return worst

    def predict(self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
                ) -> MaskPrediction:
        """Masks for one object through the decoder path in use (`decoder_kind`); see `predict_with`."""
        return self.predict_with(self.fast_decoder, embedding, prompt, prev_logits)

    def predict_with(self, decoder: FastDecoder | None, embedding: Embedding, prompt: ObjectPrompt,
                     prev_logits: np.ndarray | None = None) -> MaskPrediction:
        """Masks for one object with `decoder` (None: eager)."""
        raise NotImplementedError

    def dump(self, embedding: Embedding, compact: bool = False) -> bytes:
        """The feature tensors as bytes (see `sam_backend.segment.embedding`): float32, or float16 where `compact`
        (half the bytes, for a shared store; masks from them agree with fresh ones, see the tests)."""
        dtype = torch.float16 if compact else torch.float32
        return pack(embedding, {k: v.detach().to(dtype).cpu().contiguous().numpy()
                                for k, v in embedding.features.items()})

    def load(self, data: bytes) -> Embedding:
        """An embedding from `dump`, its features moved to this engine's device."""
        stored, arrays = unpack(data)
        if stored.engine_id != self.engine_id:
            raise EngineError(f"embedding from {stored.engine_id} given to {self.engine_id}")
        features: dict[str, Any] = {k: torch.from_numpy(v).to(self.device, torch.float32)
                                    for k, v in arrays.items()}
        return Embedding(stored.engine_id, stored.image_size, features, stored.meta)


def load_state_dict(path: Path) -> object:
    """`torch.load(weights_only=True)`, memory-mapped where the file format allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is refused
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise EngineError(
            f"refused to load {path}: expected a plain tensor checkpoint "
            f"({exc.__class__.__name__}: {first})"
        ) from None
