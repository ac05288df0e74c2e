"""Which image-encoder path this machine runs (`SAM_ENCODER`): measured, checked against fp32, remembered.

`measure_paths` times every path (`eager` in the engine's precision, `onnx`, `aoti`; see `fast_encoder`) on check
images, the preprocessed pixels and the decoder the same for all, and compares each path's masks with fp32 eager
ones for annotator-like prompts on each image (`annotator_prompts`): a path is accepted only where their mean IoU
is ≥ 0.99. (Not every mask: bf16 rounding flips a few prompts' answers between near-equal candidates; MobileSAM on
GrabCut's real clicks: mean 0.995, lowest 0.77, and NoC@90 the same; see the README.)
The fastest accepted path is chosen. The verdict is a JSON file beside the graphs, keyed like them (weights,
precision, machine), so a restart reads it and loads the chosen graph in milliseconds.

`SAM_ENCODER=auto` with no verdict yet serves with eager at once and measures in a background process at low
CPU priority (`python -m sam_backend.segment.engines.encoder_choice`, which also writes the graphs); when it is
done the engine switches to the chosen path. A named path (`onnx`, `aoti`) is measured before the engine is
ready. Check images: up to 3 photos of `SAM_CHECK_IMAGES` (a folder), else the synthetic `bench_image`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam_backend.fileio import write_atomic
from sam_backend.segment.checkpoints import graph_base, sha256_file
from sam_backend.segment.engines.fast_encoder import FAST_KINDS, export_encoder, load_encoder
from sam_backend.segment.engines.graph_files import (
    PathResult,
    Verdict,
    encoder_file,
    graph_is_measured,
    machine_key,
    verdict_file,
)
from sam_backend.segment.engines.ids import EngineId
from sam_backend.segment.samples import check_images

if TYPE_CHECKING:
    from sam_backend.segment.embedding import Embedding
    from sam_backend.segment.engines.sam import SamEngine
    from sam_backend.segment.prompts import ObjectPrompt

log = logging.getLogger(__name__)

MIN_MASK_IOU = 0.99
MEASURE_LIMIT_S = 900.0  # a background measurement still running after this is abandoned (eager serves)
MIN_MEASURED_SIDE = 512  # `auto` measures encoders of this input side and up (every published SAM is 1024)


def annotator_prompts(reference: SamEngine, embedding: Embedding, size: tuple[int, int]) -> list[ObjectPrompt]:
    """Prompts made the way annotators make them, on the objects `reference` finds at the `bench_prompts`: for
    each such object (its best mask, 0.2-90 % of the image) a box around it, a click at its deepest point, and that
    click with the standard simulator's corrective click. Prompts on an object's edge (where candidates score
    alike and the best flips on rounding) are what no annotator sends; these are what they do send."""
    from sam_backend.segment.prompts import ObjectPrompt
    from sam_backend.segment.samples import bench_prompts
    from sam_backend.segment.simulator import first_click, next_click

    w, h = size
    prompts: list[ObjectPrompt] = []
    for seed in bench_prompts(w, h):
        target = reference.predict_with(None, embedding, seed).best_mask
        if not 0.002 * w * h <= target.sum() <= 0.9 * w * h:
            continue
        ys, xs = np.nonzero(target)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        prompts.append(ObjectPrompt(np.zeros((0, 2)), np.zeros(0), box, "check", None, None, size))
        x, y, _ = first_click(target)
        click = ObjectPrompt(np.array([[x, y]]), np.array([1]), None, "check", None, None, size)
        prompts.append(click)
        fix = next_click(reference.predict_with(None, embedding, click).best_mask, target)
        if fix is not None:
            prompts.append(ObjectPrompt(np.array([[x, y], fix[:2]]), np.array([1, int(fix[2])]), None, "check", None,
                                        None, size))
    return prompts


def _masks(engine: SamEngine, image: np.ndarray, prompts: list[ObjectPrompt] | None = None
           ) -> tuple[float, list[np.ndarray], Embedding]:
    """`(seconds of the encode, the best mask of each prompt (eager decoder), the embedding)`."""
    t0 = time.perf_counter()
    embedding = engine.embed(image)
    seconds = time.perf_counter() - t0
    masks = [engine.predict_with(None, embedding, p).best_mask for p in prompts or []]
    return seconds, masks, embedding


def measure_paths(engine: SamEngine, base: Path | None, kinds: tuple[str, ...], images: list[np.ndarray],
                  progress: bool = False) -> Verdict:
    """Time and check `eager` (in the engine's precision) and each of `kinds` (see the module docstring); graph
    files are written beside `base` (None: a temporary folder, dropped after)."""
    from sam_backend.segment.simulator import iou

    if base is None:
        with tempfile.TemporaryDirectory() as tmp:
            return measure_paths(engine, Path(tmp) / "weights", kinds, images, progress)
    reference = engine.with_encoder(None).with_precision("fp32")
    reference.embed(images[0])  # warm-up
    timed = [_masks(reference, im) for im in images] + ([_masks(reference, images[0])] if len(images) == 1 else [])
    fp32_s = statistics.median(t for t, _, _ in timed)
    prompts = [annotator_prompts(reference, e, (im.shape[1], im.shape[0])) for (_, _, e), im in zip(timed, images,
                                                                                                    strict=False)]
    ref_masks = [[reference.predict_with(None, e, p).best_mask for p in ps] for (_, _, e), ps in zip(timed, prompts,
                                                                                                      strict=False)]
    side = engine.model.image_encoder.img_size
    results: list[PathResult] = []
    candidates = (["eager"] if engine.precision != "fp32" else []) + list(kinds)
    for kind in candidates:
        t0 = time.perf_counter()
        try:
            if kind == "eager":
                candidate = engine.with_encoder(None)
            else:
                path = encoder_file(base, kind, engine.precision, engine.engine_id)
                if not path.is_file():
                    export_encoder(kind, engine.model.image_encoder, side, engine.precision, path)
                digest = sha256_file(path)  # hashed before it is loaded: the bytes measured are the bytes kept
                candidate = engine.with_encoder(load_encoder(kind, path, engine.precision))
            built = time.perf_counter() - t0
            candidate.embed(images[0])  # warm-up (first-run allocations)
            runs = [_masks(candidate, im, ps) for im, ps in zip(images, prompts, strict=True)]
            if len(images) == 1:
                runs.append(_masks(candidate, images[0]))
        except Exception as exc:  # an exporter, compiler or runtime that fails here: the path is refused
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            results.append(PathResult(kind, engine.precision, False, reason=reason))
            log.warning("encoder path %s cannot run here (%s)", kind, reason)
            continue
        ious = [iou(a, b) for ref, (_, got, _) in zip(ref_masks, runs, strict=False) for a, b in zip(ref, got,
                                                                                                  strict=True)]
        mean, worst = float(np.mean(ious)) if ious else 1.0, min(ious, default=1.0)
        seconds = statistics.median(t for t, _, _ in runs)
        precision = candidate.encoder_precision
        ok = mean >= MIN_MASK_IOU
        results.append(PathResult(kind, precision, ok, round(seconds, 4), round(mean, 4), round(worst, 4),
                                  len(ious), "" if ok else f"mean masks IoU {mean:.4f} < {MIN_MASK_IOU} against fp32",
                                  "" if kind == "eager" else digest))
        if progress:
            log.info("encoder path %s (%s): %.3f s per image (built in %.0f s), masks IoU against fp32 eager: mean "
                     "%.4f, lowest %.4f over %d prompts", kind, precision, seconds, built, mean, worst, len(ious))
    if engine.precision == "fp32":
        results.insert(0, PathResult("eager", "fp32", True, round(fp32_s, 4), 1.0, 1.0, 0))
    accepted = [r for r in results if r.accepted and r.seconds is not None]
    chosen = min(accepted, key=lambda r: r.seconds).kind if accepted else "eager"
    return Verdict(engine.engine_id, machine_key(), chosen, round(fp32_s, 4), len(images), results)


def apply_verdict(engine: SamEngine, verdict: Verdict, base: Path, kind: str | None = None) -> str:
    """Put the verdict's chosen path (or `kind`, where it was accepted) into `engine`; returns the path in use."""
    return _apply(engine, verdict, base, kind) or "eager"


def _apply(engine: SamEngine, verdict: Verdict, base: Path, kind: str | None = None, remove_stale: bool = False
           ) -> str | None:
    """`apply_verdict`; None where the accepted graph is stale (missing, or not the file measured): it is never
    loaded, and with `remove_stale` removed, so that measuring again exports it anew."""
    want = kind or verdict.chosen
    result = verdict.result(want)
    engine.use_encoder(None)
    if want == "eager" or result is None or not result.accepted:
        if result is not None and not result.accepted:
            log.warning("SAM_ENCODER=%s refused on this machine (%s); images use the eager encoder", want,
                        result.reason)
        return "eager"
    path = encoder_file(base, want, engine.precision, engine.engine_id)
    if not graph_is_measured(path, result):
        if remove_stale:
            path.unlink(missing_ok=True)
        return None
    try:
        engine.use_encoder(load_encoder(want, path, engine.precision))
    except Exception as exc:  # a graph that cannot be loaded here: eager still works
        log.warning("encoder graph %s cannot be loaded (%s); images use the eager encoder", want, exc)
        return "eager"
    log.info("images use the %s encoder (%s): %.3f s per image against %.3f s fp32 eager, masks IoU %.4f",
             want, result.precision, result.seconds or 0, verdict.fp32_eager_s, result.iou or 0)
    return want


def choose_encoder(engine: SamEngine, kind: str, checkpoint: Path, images_dir: Path | None) -> str:
    """Set `engine`'s encoder path as `SAM_ENCODER=kind` asks (see the module docstring); returns the path in use
    now (`eager` while a background measurement runs). A stale graph (missing, or not the file measured) is removed
    and measured again: measuring exports it anew instead of loading what is there."""
    if kind == "eager":
        return "eager"
    base = graph_base(checkpoint)
    vfile = verdict_file(base, engine.precision)
    verdict = Verdict.read(vfile, engine.engine_id)
    if kind == "auto":
        if engine.device.type != "cpu" or engine.model.image_encoder.img_size < MIN_MEASURED_SIDE:
            return "eager"  # a GPU, or a small test model, runs the eager encoder fast
        used = _apply(engine, verdict, base, remove_stale=True) if verdict is not None else None
        if used is not None:
            return used
        engine.encoder_tuning = measure_in_background(engine, checkpoint, vfile, images_dir)
        return "eager"
    named = verdict is not None and verdict.result(kind) is not None
    used = _apply(engine, verdict, base, kind, remove_stale=True) if named else None
    if used is not None:
        return used
    verdict = measure_paths(engine, base, (kind,), check_images(images_dir), progress=True)
    _write_verdict(vfile, verdict)
    return apply_verdict(engine, verdict, base, kind)


def _write_verdict(path: Path, verdict: Verdict) -> None:
    try:
        write_atomic(path, verdict.to_json())
    except OSError as exc:
        log.warning("could not keep the encoder verdict at %s (%s); it is measured again at the next start",
                    path, exc)


def measure_in_background(engine: SamEngine, checkpoint: Path, vfile: Path, images_dir: Path | None,
                          limit_s: float = MEASURE_LIMIT_S) -> threading.Thread:
    """Measure every path in a child process, at the lowest CPU priority and on one core (`_lower_priority`);
    when it has written `vfile`, switch `engine` to the chosen path. A child still running after `limit_s` is
    killed and the measurement abandoned (logged; eager serves, and the next start measures again). Returns the
    thread that waits for it: `join()` it to drive the measurement to its end."""
    cmd = [sys.executable, "-m", "sam_backend.segment.engines.encoder_choice", "--checkpoint", str(checkpoint),
           "--engine-id", engine.engine_id, "--precision", engine.precision, "--out", str(vfile),
           "--threads", "1"]
    if images_dir is not None:
        cmd += ["--images", str(images_dir)]

    def run() -> None:
        t0 = time.monotonic()
        log.info("measuring the image encoder's paths in the background (one-off, about a minute)")
        try:
            setup = functools.partial(_lower_priority, os.getpid(), _prctl())
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, preexec_fn=setup, check=False, timeout=limit_s)
        except subprocess.TimeoutExpired:  # `run` has killed the child
            log.warning("the encoder measurement was abandoned after %.0f s (a loaded machine?); images use the "
                        "eager encoder, and the next start measures again", limit_s)
            return
        except OSError as exc:
            log.warning("the encoder measurement could not start (%s); images use the eager encoder", exc)
            return
        verdict = Verdict.read(vfile, engine.engine_id)
        if proc.returncode != 0 or verdict is None:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            log.warning("the encoder measurement failed (exit %s: %s); images use the eager encoder",
                        proc.returncode, tail[0][:300])
            return
        apply_verdict(engine, verdict, graph_base(checkpoint))
        log.info("encoder measurement done in %.0f s", time.monotonic() - t0)

    thread = threading.Thread(target=run, name="encoder-choice", daemon=True)
    thread.start()
    return thread


def _prctl() -> Any:
    """libc's `prctl`, loaded in the parent (loading a library after fork in a threaded process can deadlock)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


def _lower_priority(parent: int, prctl: Any) -> None:
    """In the measuring child, before it runs: the lowest CPU priority (it and the compiler it starts yield to clicks
    and encodes), and death with the process that started it (Linux `PR_SET_PDEATHSIG`): a backend stopped or
    replaced mid-measurement leaves no child compiling for minutes on the next one's cores. It runs on one core, the
    last this process may use, so the other is left to clicks whatever the compiler starts."""
    os.nice(19 - os.nice(0))
    with contextlib.suppress(AttributeError, OSError):  # not Linux
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[-1]})
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before that: nobody waits for this measurement
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """The background measurement: load the checkpoint as the server did, measure, write the verdict."""
    parser = argparse.ArgumentParser(description="Measure the image encoder's paths and write the verdict.")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--engine-id", required=True, help="the server's engine id: the same weights are loaded")
    parser.add_argument("--precision", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from sam_backend.segment.engines.sam import SamEngine

    digest = sha256_file(args.checkpoint)
    verified = digest if EngineId.parse(args.engine_id).weights == digest[:12] else None  # as the server loaded it
    engine = SamEngine.from_checkpoint(args.checkpoint, device="cpu", precision=args.precision,
                                       expected_sha256=verified)
    if engine.engine_id != args.engine_id:
        log.error("the checkpoint holds %s, the server runs %s", engine.engine_id, args.engine_id)
        return 2
    import fcntl

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_name(args.out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers of one host measure once; the others wait and read the verdict
        if Verdict.read(args.out, engine.engine_id) is not None:
            return 0
        verdict = measure_paths(engine, graph_base(args.checkpoint), FAST_KINDS, check_images(args.images),
                                progress=True)
        write_atomic(args.out, verdict.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
