"""The image encoder run faster than eager PyTorch (`SAM_ENCODER`): an exported graph kept in a file.

A never-seen image costs one encode, which on a 2-core CPU is most of the first click. The SAM engine's image
encoder takes a fixed input (`(1, 3, S, S) float32`, the preprocessed image padded to the encoder's side `S`) and
gives `(1, C, S/16, S/16)` features, so it exports as one static graph:

- `onnx`: `torch.onnx.export` of the fp32 encoder, run by ONNX Runtime's CPU provider (exact to ~1e-6).
- `aoti`: `torch.export` of the encoder in the engine's precision (bf16 autocast where the CPU runs it natively),
  compiled ahead of time by Inductor (`aoti_compile_and_package`, constant folding and conv/batch-norm fusion
  with `freezing`) into a package that loads in milliseconds. Compiling takes tens of seconds, once.
- `eager`: the module itself, bf16 autocast where the precision says so (the fallback).

Measured on an Intel Xeon (2 cores, AVX-512 BF16 + AMX), MobileSAM, 1024²: eager fp32 1.24 s, eager bf16
autocast 0.81 s, `onnx` fp32 0.64 s, `aoti` bf16 0.26 s. Which one wins depends on the CPU, so it is measured on
the machine and checked against fp32 eager masks before it is used (`segment.engines.encoder_choice`).
Files are keyed by the weights' digest, the graph version, the precision and the machine (torch and ONNX
Runtime versions, CPU model and flags): compiled code for one CPU is never loaded on another.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import torch

from sam_backend.fileio import write_atomic
from sam_backend.segment.engines.graph_files import ort_session

log = logging.getLogger(__name__)

FAST_KINDS = ("onnx", "aoti")


class FastEncoder(Protocol):
    """An encoder graph runner: `(1, 3, S, S) float32` preprocessed pixels → `(1, C, g, g) float32` features."""

    kind: str
    precision: str

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


class OnnxEncoder:
    """The fp32 encoder graph run by ONNX Runtime on the CPU, `threads` intra-op threads (default: torch's)."""

    kind = "onnx"
    precision = "fp32"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.session = ort_session(path, threads or torch.get_num_threads())
        self.input = self.session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: pixels.detach().to("cpu", torch.float32).contiguous().numpy()})
        return torch.from_numpy(out[0])


class AotiEncoder:
    """The encoder compiled ahead of time by Inductor (`torch._inductor.aoti_load_package`), in `precision`."""

    kind = "aoti"

    def __init__(self, path: Path, precision: str) -> None:
        self.precision = precision
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.runner = torch._inductor.aoti_load_package(str(path))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.runner(pixels.float())


class _Autocast(torch.nn.Module):
    """`encoder` under bf16 autocast where `bf16` (matmuls and convolutions in bf16; norms, softmax and the output
    in fp32, as the eager bf16 path runs). Measured on MobileSAM against the encoder cast to bf16 whole: the same
    0.26 s, masks closer to fp32 ones (the whole cast also rounds norms and softmax)."""

    def __init__(self, encoder: torch.nn.Module, bf16: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.bf16 = bf16

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.encoder(pixels).float()


def load_encoder(kind: str, path: Path, precision: str) -> FastEncoder:
    """The runner of a graph file written by `export_encoder`."""
    if kind == "onnx":
        return OnnxEncoder(path)
    if kind == "aoti":
        return AotiEncoder(path, precision)
    raise ValueError(f"fast encoder: expected one of {', '.join(FAST_KINDS)}, got {kind!r}")


def export_encoder(kind: str, encoder: torch.nn.Module, side: int, precision: str, path: Path) -> None:
    """Write the `kind` graph of `encoder` (input `(1, 3, side, side)`) to `path` atomically; any exporter or
    compiler failure is raised as it came."""
    example = torch.zeros(1, 3, side, side)
    if kind == "onnx":
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints in the window partitioning
            torch.onnx.export(copy.deepcopy(encoder).float().eval(), (example,), buffer, input_names=["pixels"],
                              output_names=["features"], opset_version=17, do_constant_folding=True, dynamo=False)
        write_atomic(path, buffer.getvalue())
        return
    if kind != "aoti":
        raise ValueError(f"fast encoder: expected one of {', '.join(FAST_KINDS)}, got {kind!r}")
    module = _Autocast(copy.deepcopy(encoder).float().eval(), precision == "bf16")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,))
            torch._inductor.aoti_compile_and_package(program, package_path=tmp,
                                                     inductor_configs={"freezing": True})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
