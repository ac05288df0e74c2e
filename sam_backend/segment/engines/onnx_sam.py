"""SAM served from its cached ONNX Runtime graphs, without importing torch: a restart answers clicks in about a second.

Importing torch and segment-anything, loading the weights and the compiled encoder take a few seconds at every start.
Once the torch engine has measured this machine (the encoder verdict, `encoder_choice`) and checked its decoder
graph (the decoder verdict), both ONNX graphs lie beside the checkpoint with their SHA-256 recorded.
`quick_engine(settings)` builds `OnnxSamEngine` from them: each graph is hashed and compared with its verdict before
it is loaded, and anything missing, stale or not applicable (another engine, a GPU, a path the settings exclude)
gives None and the reason, so the start takes the torch path as before.

Its embeddings carry the torch engine's id (the same weights and precision: the ONNX encoder is one of that engine's
measured paths), so what it encodes stays valid when the torch engine takes over (`serving.loader.EngineHolder`);
its inputs and masks are built by `sam_inputs`, as the torch engine builds them. It cannot adapt (learning needs
torch): `EngineHolder.full` is what learning and adapted projects wait for.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sam_backend.segment.embedding import Embedding, pack, unpack
from sam_backend.segment.engines import EngineError, MaskPrediction, check_image
from sam_backend.segment.engines.graph_files import (
    Verdict,
    decoder_file,
    decoder_verdict_file,
    encoder_file,
    graph_is_measured,
    ort_session,
    read_decoder_verdict,
    verdict_file,
)
from sam_backend.segment.engines.ids import EngineId
from sam_backend.segment.engines.sam_inputs import (
    answer,
    encoder_pixels,
    graph_candidates,
    prompt_arrays,
    prompt_feed,
    resize_longest,
    wants_candidates,
)
from sam_backend.segment.geometry import ImageSize

if TYPE_CHECKING:
    from sam_backend.config import Settings
    from sam_backend.segment.prompts import ObjectPrompt

log = logging.getLogger(__name__)


class OnnxSamEngine:
    """SAM's encoder and decoder graphs run by ONNX Runtime on the CPU (`Engine` protocol; thread-safe)."""

    encoder_kind = "onnx"
    decoder_kind = "onnx"
    encoder_precision = "fp32"

    def __init__(self, identity: EngineId, encoder_graph: Path, decoder_graph: Path, threads: int | None = None
                 ) -> None:
        threads = threads or len(os.sched_getaffinity(0))
        self.id = replace(identity, encoder="onnx")
        self.engine_id = identity.format()
        self.encoder = ort_session(encoder_graph, threads)
        self.decoder = ort_session(decoder_graph, threads)
        shape = self.encoder.get_inputs()[0].shape  # (1, 3, S, S)
        self.side = shape[-1] if isinstance(shape[-1], int) else 1024
        out = self.encoder.get_outputs()[0].shape  # (1, C, g, g)
        self.grid = out[-1] if isinstance(out[-1], int) else self.side // 16
        self._input = self.encoder.get_inputs()[0].name
        self._names = [i.name for i in self.decoder.get_inputs()]
        self._encode_lock = threading.Lock()  # one encode at a time bounds peak memory, as the torch engine

    def embed(self, image: np.ndarray) -> Embedding:
        """`(H, W, 3) uint8 RGB` → `image_embed` `(1, C, g, g) float32` (numpy), meta `input_size` `[h, w]`."""
        check_image(image)
        resized = resize_longest(image, self.side)
        pixels = encoder_pixels(resized, self.side)
        with self._encode_lock:
            features = self.encoder.run(None, {self._input: pixels})[0]
        return Embedding(self.engine_id, ImageSize.of(image), {"image_embed": np.ascontiguousarray(features)},
                         {"input_size": [int(resized.shape[0]), int(resized.shape[1])]})

    def predict(self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
                ) -> MaskPrediction:
        """Masks for one object, as `SamEngine.predict` with its onnx decoder: 3 candidates for a lone first click,
        else one seeded with `prev_logits` `(4g, 4g)`."""
        if embedding.engine_id != self.engine_id:
            raise EngineError(f"embedding from {embedding.engine_id} given to {self.engine_id}")
        original = embedding.image_size.shape
        size = tuple(embedding.meta["input_size"])
        feed = prompt_feed(*prompt_arrays(prompt, original, size, self.side, self.grid, prev_logits), self.grid)
        feed["image_embeddings"] = np.ascontiguousarray(embedding.features["image_embed"], dtype=np.float32)
        logits, scores = self.decoder.run(None, {k: feed[k] for k in self._names})
        chosen = graph_candidates(wants_candidates(prompt, prev_logits))
        return answer(logits[0, chosen], scores[0, chosen], size, original, self.side)

    def dump(self, embedding: Embedding, compact: bool = False) -> bytes:
        """As `TorchEngine.dump`: float32 features, float16 where `compact`."""
        dtype = np.float16 if compact else np.float32
        return pack(embedding, {k: np.asarray(v).astype(dtype) for k, v in embedding.features.items()})

    def load(self, data: bytes) -> Embedding:
        stored, arrays = unpack(data)
        if stored.engine_id != self.engine_id:
            raise EngineError(f"embedding from {stored.engine_id} given to {self.engine_id}")
        return Embedding(stored.engine_id, stored.image_size,
                         {k: v.astype(np.float32) for k, v in arrays.items()}, stored.meta)


def quick_engine(settings: Settings) -> OnnxSamEngine | None:
    """The torch-free engine of these settings' weights from their measured ONNX graphs, or None (logged why)."""
    why = _not_applicable(settings)
    if why is None:
        try:
            found = _graphs(settings)
        except EngineError as exc:  # the checkpoint is missing or does not verify: the torch load says so
            found = f"the checkpoint: {exc}"
        if isinstance(found, str):
            why = found
        else:
            identity, encoder_graph, decoder_graph = found
            try:
                return OnnxSamEngine(identity, encoder_graph, decoder_graph)
            except Exception as exc:  # a graph ONNX Runtime refuses: torch loads as before
                why = f"ONNX Runtime cannot load the graphs ({type(exc).__name__})"
    log.info("starting with torch (no torch-free start: %s)", why)
    return None


def _not_applicable(settings: Settings) -> str | None:
    import importlib.util

    if settings.engine != "sam":
        return f"SAM_ENGINE={settings.engine}"
    if settings.device not in ("cpu", "auto") or (settings.device == "auto" and Path("/dev/nvidiactl").exists()):
        return "a GPU may serve (SAM_DEVICE)"
    if settings.encoder == "eager" or settings.decoder not in ("auto", "onnx"):
        return f"SAM_ENCODER={settings.encoder}, SAM_DECODER={settings.decoder}"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return None


def _graphs(settings: Settings) -> tuple[EngineId, Path, Path] | str:
    """`(engine id, encoder graph, decoder graph)`, each graph the very file its verdict accepted; else why not."""
    from sam_backend.segment.checkpoints import checked_file_id, expected_sha256, graph_base
    from sam_backend.segment.cpu import precision_on_cpu

    checkpoint = settings.checkpoint_path
    weights = checked_file_id(checkpoint, expected_sha256(settings), label="SAM", model_type=settings.model_type,
                              unverified="its engine id is the file's path, size and time")[:12]
    base = graph_base(checkpoint)
    decoder_graph = decoder_file(base, weights)
    model = settings.model_type if settings.checkpoint is None else _model_of(decoder_graph)
    precision = precision_on_cpu(settings.precision)
    identity = EngineId("sam", model or "", weights, precision)
    verdict = Verdict.read(verdict_file(base, precision), identity.format())
    result = verdict.result("onnx") if verdict is not None else None
    if result is None or not result.accepted:
        return "no accepted ONNX encoder graph measured for these weights on this machine yet"
    encoder_graph = encoder_file(base, "onnx", precision, identity.format())
    if not graph_is_measured(encoder_graph, result):
        return f"{encoder_graph.name} is not the graph measured"
    decoder = read_decoder_verdict(decoder_graph, identity.format())
    if decoder is None or not decoder["accepted"]:
        return "no accepted ONNX decoder graph for these weights yet"
    return identity, encoder_graph, decoder_graph


def _model_of(graph: Path) -> str | None:
    """The model a decoder verdict was written for (`SAM_CHECKPOINT`'s model is read off its tensors by torch)."""
    try:
        return EngineId.parse(json.loads(decoder_verdict_file(graph).read_text())["engine_id"]).model
    except (OSError, ValueError, KeyError, TypeError):
        return None
