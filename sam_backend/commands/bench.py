"""Timing of the segmentation core on this machine (`sam-backend bench`).

All figures are medians in seconds over `repeats` runs, measured in one process on one synthetic
image (default 1024 × 768), so ratios compare like with like:

- `encoder_fp32_s`, `encoder_bf16_s`: the image encoder alone, fp32 and bf16 autocast.
- `decode_s`: prompt encoder + mask decoder on a cached embedding, masks upsampled to the image.
- `refine_s`, `rle_s`: the stages after it: mask refinement, Label Studio brush RLE.
- `first_click_s`: a new image: hash, encode (configured precision), decode, refine.
- `repeat_click_s`: a click on a cached image: hash, cache hit, decode, refine.
- `reembed_baseline_s`: re-encode (fp32) on every click, then decode, as Label Studio's SAM2 example does.
- `bf16_mask_iou`: the lowest IoU between fp32- and bf16-embedding masks over several prompts.

Any engine can be measured (GrabCut too). bf16 is measured only where the hardware runs it natively
(`bf16_native`); elsewhere an emulated bf16 encode takes minutes, so `encoder_bf16_s` and
`bf16_mask_iou` are null. Every result names the CPU model and its relevant flags.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sam_backend.config import RefineSettings
from sam_backend.segment.engines import Engine
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.refine import refine
from sam_backend.serving.cache import EmbeddingCache

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "neon", "asimd")


def cpu_info() -> dict[str, Any]:
    """`{"cpu": model name, "cpu_flags": the relevant ones present}` from /proc/cpuinfo (empty elsewhere)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}

log = logging.getLogger(__name__)


def bench_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """`(H, W, 3) uint8 RGB`: smooth noise with a few filled shapes (objects to click on)."""
    import cv2

    rng = np.random.default_rng(seed)
    low = rng.integers(40, 200, size=(max(2, height // 32), max(2, width // 32), 3)).astype(np.uint8)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    cv2.circle(image, (width // 3, height // 2), height // 6, (230, 120, 30), -1)
    cv2.rectangle(image, (width // 2, height // 4), (width * 4 // 5, height * 3 // 4), (40, 70, 220), -1)
    return image


def bench_prompts(width: int, height: int) -> list[ObjectPrompt]:
    """Five prompts: one click, two clicks, a click and a negative click, a box, a box with a click."""
    size = (width, height)
    c = (width / 3, height / 2)
    r = ((width / 2 + width * 4 / 5) / 2, height / 2)
    box = np.array([width / 2 - 10, height / 4 - 10, width * 4 / 5 + 10, height * 3 / 4 + 10], np.float32)
    mk = ObjectPrompt
    return [
        mk(np.array([c]), np.array([1]), None, "a", None, None, size),
        mk(np.array([c, (c[0] + 20, c[1] + 15)]), np.array([1, 1]), None, "a", None, None, size),
        mk(np.array([r, (r[0], height * 0.15)]), np.array([1, 0]), None, "b", None, None, size),
        mk(np.zeros((0, 2)), np.zeros(0), box, "b", None, None, size),
        mk(np.array([r]), np.array([1]), box, "b", None, None, size),
    ]


def _loaded_torch() -> Any:
    """torch if an engine that runs it has imported it, else None (GrabCut alone never loads it)."""
    import sys

    return sys.modules.get("torch")


def _median(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `fn`, waiting for queued GPU work so that asynchronous kernels count."""
    torch = _loaded_torch()
    sync = torch.cuda.synchronize if torch is not None and torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run_bench(engine: Engine, *, width: int = 1024, height: int = 768, repeats: int = 3,
              click_repeats: int = 20, refine_settings: RefineSettings | None = None) -> dict[str, Any]:
    """Measure the figures above with `engine` (its precision is the configured one)."""
    refine_settings = refine_settings or RefineSettings()
    with_precision = getattr(engine, "with_precision", None)
    fp32 = with_precision("fp32") if with_precision else engine
    bf16_native = bool(getattr(engine, "bf16_native", False))
    bf16 = with_precision("bf16") if with_precision and bf16_native else None
    image = bench_image(width, height)
    prompts = bench_prompts(width, height)
    log.info("warming up %s", engine.engine_id)
    for variant in (fp32, bf16):
        if variant is not None:
            variant.embed(bench_image(64, 48, seed=9))

    log.info("encoder fp32 x%d", repeats)
    encoder_fp32 = _median(lambda: fp32.embed(image), repeats)
    encoder_bf16 = None
    ious: list[float] = []
    if bf16 is not None:
        log.info("encoder bf16 x%d", repeats)
        encoder_bf16 = _median(lambda: bf16.embed(image), repeats)
        emb32, emb16 = fp32.embed(image), bf16.embed(image)
        for p in prompts:
            a, b = fp32.predict(emb32, p), bf16.predict(emb16, p)
            ious.append(_iou(a.best_mask, b.best_mask))

    emb = engine.embed(image)
    decode = _median(lambda: [engine.predict(emb, p) for p in prompts], click_repeats) / len(prompts)
    # Stages of a cached click after the decoder: refinement and brush RLE of the answered mask.
    from sam_backend.labelstudio.brush import encode_brush

    pred = engine.predict(emb, prompts[0])
    refine_s = _median(lambda: refine(pred.best_mask, prompts[0], refine_settings), click_repeats)
    refined = refine(pred.best_mask, prompts[0], refine_settings)
    rle_s = _median(lambda: encode_brush(refined), click_repeats)

    cache: EmbeddingCache = EmbeddingCache(1 << 30)

    def click(img: np.ndarray, prompt: ObjectPrompt) -> np.ndarray:
        key = (engine.engine_id, hashlib.sha256(img.tobytes()).hexdigest())
        embedding, _ = cache.get_or_compute(key, lambda: engine.embed(img))
        pred = engine.predict(embedding, prompt)
        return refine(pred.best_mask, prompt, refine_settings)

    seeds = iter(range(100, 100 + repeats))
    log.info("first click x%d", repeats)
    first_click = _median(lambda: click(bench_image(width, height, next(seeds)), prompts[0]), repeats)
    click(image, prompts[0])
    repeat_click = _median(lambda: [click(image, p) for p in prompts], click_repeats) / len(prompts)

    def reembed_click() -> None:
        pred = fp32.predict(fp32.embed(image), prompts[0])
        refine(pred.best_mask, prompts[0], refine_settings)

    log.info("re-embed baseline x%d", repeats)
    reembed = _median(reembed_click, repeats)
    torch = _loaded_torch()
    return {
        "model": getattr(engine, "architecture_name", engine.engine_id.split("/")[0]),
        "engine_id": engine.engine_id,
        "device": str(getattr(engine, "device", "cpu")),
        "precision": getattr(engine, "precision", "fp32"),
        **cpu_info(),
        "bf16_native": bf16_native,
        "torch": torch.__version__ if torch is not None else None,
        "threads": torch.get_num_threads() if torch is not None else None,
        "image": [width, height],
        "repeats": repeats,
        "encoder_fp32_s": round(encoder_fp32, 4),
        "encoder_bf16_s": None if encoder_bf16 is None else round(encoder_bf16, 4),
        "decode_s": round(decode, 4),
        "refine_s": round(refine_s, 4),
        "rle_s": round(rle_s, 4),
        "first_click_s": round(first_click, 4),
        "repeat_click_s": round(repeat_click, 4),
        "reembed_baseline_s": round(reembed, 4),
        "embedding_mb": round(emb.nbytes / 2**20, 2),
        "bf16_mask_iou": round(min(ious), 4) if ious else None,
        "bf16_mask_iou_mean": round(float(np.mean(ious)), 4) if ious else None,
        "bf16_over_fp32": None if encoder_bf16 is None else round(encoder_bf16 / encoder_fp32, 3),
        "reembed_over_repeat": round(reembed / repeat_click, 1),
    }
