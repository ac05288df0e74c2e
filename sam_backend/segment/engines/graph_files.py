"""Where the exported graphs and their verdicts live, and how a verdict is read: without importing torch.

Every graph and verdict sits beside the checkpoint (`checkpoints.graph_base`), named by what it depends on:
- the image encoder's graph: `<ckpt>.encoder-<version>-<weights>-<kind>-<precision>-<machine>.<onnx|pt2>`, and the
  verdict on every path measured (`Verdict`): `<ckpt>.encoder-<version>-<precision>-<machine>.json`;
- the decoder's ONNX graph: `<ckpt>.decoder-<version>-<weights>.onnx`, its verdict `<graph>.json` (tied to the
  graph's SHA-256 and the engine id).

`<machine>` is `machine_key()`: torch and ONNX Runtime versions, CPU model and flags. The torch version is read from
torch's `version.py`, so the key is the same whether torch is imported or not: the torch-free start
(`engines.onnx_sam`) finds the very files the torch engine measured.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sam_backend.fileio import write_atomic
from sam_backend.segment.checkpoints import sha256_file
from sam_backend.segment.cpu import CpuInfo, cpu_info
from sam_backend.segment.engines.ids import EngineId

log = logging.getLogger(__name__)

ENCODER_GRAPH_VERSION = "e2"
# Bump when a decoder graph module's inputs, outputs or computation change: old cached exports are then ignored.
DECODER_GRAPH_VERSION = "g2"  # g2: SAM's decoder graph laid out for a CPU (`SamDecoderGraph`)
MIN_DECODER_IOU = 0.999  # a fast decoder's masks against eager ones, every candidate of a table of prompts


@functools.lru_cache(maxsize=1)
def torch_version() -> str:
    """torch's `__version__` (`2.14.1+cu130`), read from its `version.py` unless torch is already imported;
    `no-torch` where it is not installed."""
    module = sys.modules.get("torch")
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "no-torch"
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return "no-torch"
    found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    return found.group(1) if found else "no-torch"


def machine_key() -> str:
    """12 hex digits naming what a compiled graph depends on: torch and ONNX Runtime versions, CPU model and flags."""
    parts = [torch_version()]
    try:
        parts.append(importlib.metadata.version("onnxruntime"))
    except importlib.metadata.PackageNotFoundError:
        parts.append("no-ort")
    cpu = cpu_info()
    parts += [v for v in (cpu.model, cpu.flags) if v is not None] if cpu != CpuInfo() else ["no-cpuinfo"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def ort_session(model: Path | bytes, threads: int):  # noqa: ANN201 - onnxruntime's InferenceSession
    """An ONNX Runtime CPU session of a graph file (or its bytes): every optimization, `threads` intra-op threads,
    one inter-op thread, and no busy-waiting (spinning worker threads slowed what runs after them: a whole click took
    54.8 ms without spinning and 62.6 ms with it, measured side by side)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


# -- the image encoder ------------------------------------------------------------------------------------------


def encoder_file(base: Path, kind: str, precision: str, engine_id: str) -> Path:
    """Where the `kind` graph of the checkpoint `base` is kept: beside it, named by the weights' digest (from
    `engine_id`), the graph version, precision and machine, so a graph of other weights is never picked up."""
    suffix = "onnx" if kind == "onnx" else "pt2"
    precision = "fp32" if kind == "onnx" else precision
    return base.with_name(f"{base.name}.encoder-{ENCODER_GRAPH_VERSION}-{EngineId.parse(engine_id).weights}-{kind}-"
                          f"{precision}-{machine_key()}.{suffix}")


def verdict_file(base: Path, precision: str) -> Path:
    """Where the encoder verdict of the checkpoint `base` in `precision` on this machine is kept."""
    return base.with_name(f"{base.name}.encoder-{ENCODER_GRAPH_VERSION}-{precision}-{machine_key()}.json")


@dataclass
class PathResult:
    """One encoder path on this machine: median seconds per encode; the mean and lowest IoU of its masks against
    fp32 eager ones over `prompts` annotator-like prompts (`encoder_choice.annotator_prompts`)."""

    kind: str
    precision: str
    accepted: bool
    seconds: float | None = None
    iou: float | None = None
    min_iou: float | None = None
    prompts: int = 0
    reason: str = ""
    sha256: str = ""  # the graph file measured (its SHA-256): only that file is ever loaded for this path


@dataclass
class Verdict:
    """Every path measured for one engine on one machine, and the one chosen (`eager` where none is faster)."""

    engine_id: str
    machine: str
    chosen: str
    fp32_eager_s: float
    images: int
    paths: list[PathResult] = field(default_factory=list)
    version: str = ENCODER_GRAPH_VERSION

    def result(self, kind: str) -> PathResult | None:
        return next((p for p in self.paths if p.kind == kind), None)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def read(cls, path: Path, engine_id: str) -> Verdict | None:
        """The verdict in `path` for `engine_id` on this machine, or None (missing, torn, another engine or CPU)."""
        try:
            raw = json.loads(path.read_text())
            verdict = cls(**{**raw, "paths": [PathResult(**p) for p in raw.get("paths", [])]})
        except (OSError, ValueError, TypeError):
            return None
        if (verdict.engine_id, verdict.machine, verdict.version) != (engine_id, machine_key(),
                                                                     ENCODER_GRAPH_VERSION):
            return None
        return verdict


def graph_is_measured(path: Path, result: PathResult) -> bool:
    """Whether `path` holds the very bytes `result` measured (its SHA-256); a graph swapped, torn or of an older
    verdict is never loaded (a compiled graph is a shared library: loading it runs its code). Logged where not."""
    if not path.is_file():
        log.warning("encoder graph %s cannot be loaded (it is missing); images use the eager encoder", path)
        return False
    digest = sha256_file(path)
    if not result.sha256 or digest != result.sha256:
        log.warning("encoder graph %s is not the file that was measured (SHA-256 %s, measured %s); it is not loaded: "
                    "images use the eager encoder and the paths are measured again", path, digest[:12],
                    (result.sha256 or "none")[:12])
        return False
    return True


# -- the decoder ------------------------------------------------------------------------------------------------


def decoder_file(checkpoint: Path, weights: str) -> Path:
    """Where the exported decoder graph of the weights `weights` (digest, 12 hex digits) is kept: next to
    `checkpoint`, keyed by the weights and the graph version."""
    return checkpoint.with_name(f"{checkpoint.name}.decoder-{DECODER_GRAPH_VERSION}-{weights}.onnx")


def decoder_verdict_file(graph: Path) -> Path:
    return graph.with_name(graph.name + ".json")


def read_decoder_verdict(graph: Path | None, engine_id: str) -> dict | None:
    """The kept verdict on `graph` for `engine_id` (`{"accepted", "iou"}`), or None where there is none, it is torn,
    or the graph's bytes are not the ones it was given for."""
    if graph is None or not graph.is_file():
        return None
    try:
        verdict = json.loads(decoder_verdict_file(graph).read_text())
        if verdict.get("engine_id") != engine_id or verdict.get("graph_sha256") != sha256_file(graph):
            return None
        return {"accepted": bool(verdict["accepted"]), "iou": float(verdict["iou"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_decoder_verdict(graph: Path | None, engine_id: str, iou: float) -> None:
    """Keep the verdict on `graph` beside it (skipped where the place cannot be written)."""
    try:
        digest = sha256_file(graph) if graph is not None else None
    except OSError:
        digest = None
    if digest is None:
        return
    data = {"engine_id": engine_id, "graph_sha256": digest, "iou": round(iou, 5), "accepted": iou >= MIN_DECODER_IOU,
            "min_iou": MIN_DECODER_IOU}
    try:
        write_atomic(decoder_verdict_file(graph), json.dumps(data).encode())
    except OSError as exc:
        log.warning("could not keep the decoder verdict beside %s (%s)", graph, exc)
