"""The prompt encoder + mask decoder as one graph, run faster than eager PyTorch (`SAM_DECODER`).

A click on a cached image runs only the prompt encoder and the mask decoder. In eager PyTorch on a
CPU that costs tens of milliseconds, a third of it in copies and element-wise adds that a fused graph
does not pay. Each torch engine gives its decoder as a graph module with fixed tensor inputs
(`decoder_graph`): point coordinates in the model's input space with Label Studio's box corners and
the padding point folded in as labels 2, 3 and -1, the previous low-res logits with a `has_mask_input`
flag, and the image features; it returns the low-res logits and scores of *every* mask token
(`(1, T, 256, 256)`, `(1, T)`), so that the engine chooses the candidates exactly as its eager path does.

Kinds:
- `onnx`: exported once from the loaded weights (`torch.onnx.export`), cached next to the checkpoint
  under a name keyed by the weights' digest and the graph version, and run by ONNX Runtime on the CPU.
- `compile`: `torch.compile` of the same graph (tens of seconds to compile at start).
- `eager`: the engine's own prompt encoder and mask decoder calls (the fallback).

`auto` is `onnx` on a CPU where onnxruntime is installed, `eager` elsewhere (a GPU runs eager fast).
Before a fast kind is used the engine compares its masks with eager ones on a table of prompts; below
IoU 0.999 it is refused and eager stays (see `TorchEngine.use_decoder`).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
import warnings
from pathlib import Path
from typing import Protocol

import torch

from sam_backend.config import DECODERS
from sam_backend.fileio import write_atomic
from sam_backend.segment.engines.graph_files import ort_session

log = logging.getLogger(__name__)


class FastDecoder(Protocol):
    """A decoder graph runner: named input tensors → `(logits (1, T, h, w), scores (1, T))` float32 tensors."""

    kind: str

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_decoder(kind: str, device: torch.device) -> str:
    """`auto` → `onnx` on a CPU with onnxruntime installed, else `eager`; other kinds as given."""
    if kind not in DECODERS:
        raise ValueError(f"SAM_DECODER: expected one of {', '.join(DECODERS)}, got {kind!r}")
    if kind != "auto":
        return kind
    return "onnx" if device.type == "cpu" and onnxruntime_available() else "eager"


class OnnxDecoder:
    """The graph exported to ONNX (or read from `cache`) and run by ONNX Runtime's CPU provider.

    `cache` is the file the export is kept in; None keeps it in memory only. A cached file that ONNX Runtime
    cannot load is exported again and replaced (written to a temporary file, then renamed).
    """

    kind = "onnx"

    def __init__(self, graph: torch.nn.Module, example: dict[str, torch.Tensor], *, cache: Path | None = None,
                 threads: int | None = None, dynamic: tuple[str, ...] = ("point_coords", "point_labels")) -> None:
        self.names = list(example)
        threads = threads or torch.get_num_threads()
        self.session = None
        self.from_cache = False  # whether the graph was read from `cache` (else exported by this call)
        if cache is not None and cache.is_file():
            try:
                self.session = ort_session(cache, threads)
                if [i.name for i in self.session.get_inputs()] != self.names:
                    raise ValueError(f"inputs {[i.name for i in self.session.get_inputs()]}, expected {self.names}")
                self.from_cache = True
                log.info("decoder graph read from %s", cache)
            except Exception as exc:  # a torn or foreign file: export again
                log.warning("ignored the cached decoder graph %s (%s); exporting it again", cache, exc)
                self.session = None
        if self.session is None:
            model = export_onnx(graph, example, dynamic)
            if cache is not None:
                _write_atomic(cache, model)
            self.session = ort_session(model, threads)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {k: inputs[k].detach().to("cpu", torch.float32).contiguous().numpy() for k in self.names}
        logits, scores = self.session.run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(scores)


def export_onnx(graph: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: tuple[str, ...]) -> bytes:
    """ONNX bytes of `graph` traced on `example` (the named inputs in order), the point axis dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints in the graph modules
        torch.onnx.export(graph, tuple(example.values()), buffer, input_names=list(example),
                          output_names=["low_res_logits", "scores"],
                          dynamic_axes={name: {1: "points"} for name in dynamic}, opset_version=17,
                          do_constant_folding=True, dynamo=False)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (`sam_backend.fileio`); a place that cannot be written is skipped."""
    try:
        write_atomic(path, data)
        log.info("decoder graph cached at %s (%.1f MB)", path, len(data) / 2**20)
    except OSError as exc:
        log.warning("could not cache the decoder graph at %s (%s); it is exported again at each start", path, exc)


class CompiledDecoder:
    """`torch.compile` of the graph (Inductor); compiled on the first call, once per point count."""

    kind = "compile"

    def __init__(self, graph: torch.nn.Module, example: dict[str, torch.Tensor]) -> None:
        self.names = list(example)
        self.compiled = torch.compile(graph, dynamic=False)
        self._lock = threading.Lock()  # Dynamo's first trace of a shape is not safe to run twice at once

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock, torch.inference_mode():
            logits, scores = self.compiled(*(inputs[k] for k in self.names))
        return logits, scores


def build_fast_decoder(kind: str, graph: torch.nn.Module, example: dict[str, torch.Tensor], *,
                       cache: Path | None = None) -> FastDecoder:
    """An `onnx` or `compile` runner of `graph` (see the module docstring)."""
    if kind == "onnx":
        return OnnxDecoder(graph, example, cache=cache)
    if kind == "compile":
        return CompiledDecoder(graph, example)
    raise ValueError(f"fast decoder: expected onnx or compile, got {kind!r}")

