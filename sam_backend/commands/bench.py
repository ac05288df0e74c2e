"""Timing of the segmentation core on this machine (`sam-backend bench`).

All figures are medians in seconds over `repeats` runs, measured in one process on one synthetic
image (default 1024 × 768), so ratios compare like with like:

- `encoder_fp32_s`, `encoder_bf16_s`: the image encoder alone, fp32 and bf16 autocast.
- `decode_s`: prompt encoder + mask decoder on a cached embedding, through the decoder path in use
  (`decoder`), at low resolution (nothing upsampled).
- `decoders`: the same for each decoder path, measured side by side in alternating blocks (`eager`, `onnx`,
  `compile` where asked), with `decoder_iou` (lowest mask IoU against eager over every candidate of the
  prompt table) and `decoder_speedup` (eager ÷ that path).
- `stages`: per-stage medians of a cached click: `decoder`, `upsample` (the chosen mask to the image),
  `refine`, `rle` (the Label Studio brush result), `json` (the response body), and `http` (the whole click
  as a `/predict` request through the real Flask app on 127.0.0.1); `http_over_decoder` = http ÷ decoder.
- `refine_s`, `rle_s`: the same refinement and brush RLE stages (kept under their earlier names).
- `first_click_s`: a new image: hash, encode (configured precision), decode, refine.
- `repeat_click_s`: a click on a cached image: hash, cache hit, decode, refine.
- `reembed_baseline_s`: re-encode (fp32) on every click, then decode, as Label Studio's SAM2 example does.
- `bf16_mask_iou`: the lowest IoU between fp32- and bf16-embedding masks over several prompts.
- `encoders` (SAM engine): every image-encoder path (`eager` in the engine's precision, `onnx`, `aoti`) with its
  median seconds per image, `speedup` over fp32 eager and masks IoU against fp32 eager (mean and lowest over
  annotator-like prompts on the check images: `--check-images DIR`, else the synthetic image), as
  `segment.engines.encoder_choice` measures them at a server's first start; `encoder` is the one chosen, and the
  click figures below run with it.

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
from sam_backend.segment.cpu import cpu_info as read_cpu
from sam_backend.segment.engines import EncoderChoosing, Engine, PathChoosing
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.refine import refine
from sam_backend.segment.samples import bench_image, bench_prompts
from sam_backend.segment.simulator import iou
from sam_backend.serving.cache import EmbeddingCache

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "neon", "asimd")


def cpu_info() -> dict[str, Any]:
    """`{"cpu": model name, "cpu_flags": the relevant ones present}` (see `segment.cpu`; "unknown" where unread)."""
    cpu = read_cpu()
    return {"cpu": cpu.model or "unknown", "cpu_flags": [f for f in CPU_FLAGS if f in cpu.flag_set]}

log = logging.getLogger(__name__)


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


def compare_encoders(engine: Engine, kinds: tuple[str, ...], graphs: Path | None, check_dir: Path | None
                     ) -> dict[str, Any]:
    """`{"encoder": chosen, "encoders": [...]}` (see the module docstring), the chosen path put into `engine`;
    `{}` for an engine without a SAM image encoder. Graph files go beside `graphs` (None: a temporary folder)."""
    if not kinds or not isinstance(engine, EncoderChoosing):
        return {}
    from sam_backend.segment.engines.encoder_choice import apply_verdict, measure_paths
    from sam_backend.segment.samples import check_images

    verdict = measure_paths(engine, graphs, kinds, check_images(check_dir), progress=True)
    rows = [{"kind": "eager", "precision": "fp32", "seconds": verdict.fp32_eager_s, "speedup": 1.0, "iou": 1.0,
             "min_iou": 1.0, "accepted": True}] if engine.precision != "fp32" else []
    for r in verdict.paths:
        rows.append({"kind": r.kind, "precision": r.precision, "seconds": r.seconds,
                     "speedup": round(verdict.fp32_eager_s / r.seconds, 2) if r.seconds else None,
                     "iou": r.iou, "min_iou": r.min_iou, "accepted": r.accepted, **({"reason": r.reason}
                                                                                     if r.reason else {})})
    if graphs is not None:
        apply_verdict(engine, verdict, graphs)
    else:
        engine.use_encoder(None)
    return {"encoder": engine.encoder_kind, "encoder_check_images": verdict.images,
            "encoder_prompts": max((r.prompts for r in verdict.paths), default=0), "encoders": rows}


def run_bench(engine: Engine, *, width: int = 1024, height: int = 768, repeats: int = 3,
              click_repeats: int = 20, refine_settings: RefineSettings | None = None,
              decoders: tuple[str, ...] = ("eager", "onnx", "compile"), http: bool = True,
              encoders: tuple[str, ...] = (), graphs: Path | None = None, check_dir: Path | None = None
              ) -> dict[str, Any]:
    """Measure the figures above with `engine` (its precision and decoder path are the configured ones; its encoder
    path the fastest accepted of `encoders` where they are measured)."""
    refine_settings = refine_settings or RefineSettings()
    if graphs is None and encoders:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # graphs of random weights live as long as the bench
            return run_bench(engine, width=width, height=height, repeats=repeats, click_repeats=click_repeats,
                             refine_settings=refine_settings, decoders=decoders, http=http, encoders=encoders,
                             graphs=Path(tmp) / "weights", check_dir=check_dir)
    paths_of_encoder = compare_encoders(engine, encoders, graphs, check_dir)
    tunable = isinstance(engine, PathChoosing)
    image = bench_image(width, height)
    prompts = bench_prompts(width, height)
    precisions = encoder_precisions(engine, image, prompts, repeats)
    emb = engine.embed(image)
    paths = compare_decoders(engine, emb, prompts, decoders, click_repeats)
    stages = click_stages(engine, emb, prompts, refine_settings, click_repeats)
    if http:
        stages["http"] = http_click(engine, image, prompts[0], click_repeats, refine_settings)
    clicks = cached_clicks(engine, image, prompts, refine_settings, repeats, click_repeats)
    torch = _loaded_torch()
    return {
        "model": engine.id.model,
        "engine_id": engine.engine_id,
        "device": str(engine.device) if tunable else "cpu",
        "precision": engine.precision if tunable else "fp32",
        **cpu_info(),
        "bf16_native": tunable and engine.bf16_native,
        "torch": torch.__version__ if torch is not None else None,
        "threads": torch.get_num_threads() if torch is not None else None,
        "image": [width, height],
        "repeats": repeats,
        **precisions,
        **paths_of_encoder,
        "decoder": engine.decoder_kind if tunable else "-",
        "decode_s": round(stages["decoder"], 4),
        **paths,
        "stages": {k: round(v, 4) for k, v in stages.items()},
        "http_over_decoder": round(stages["http"] / stages["decoder"], 2) if "http" in stages else None,
        "refine_s": round(stages["refine"], 4),
        "rle_s": round(stages["rle"], 4),
        **clicks,
        "embedding_mb": round(emb.nbytes / 2**20, 2),
    }


def encoder_precisions(engine: Engine, image: np.ndarray, prompts: list[ObjectPrompt], repeats: int
                       ) -> dict[str, Any]:
    """The eager encoder in fp32 and (where the CPU runs it natively) bf16: median seconds, and the bf16 masks'
    IoU against fp32 ones over `prompts`."""
    fp32 = _eager(engine, "fp32")
    bf16 = _eager(engine, "bf16") if isinstance(engine, PathChoosing) and engine.bf16_native else None
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
            ious.append(iou(a.best_mask, b.best_mask))
    return {"encoder_fp32_s": round(encoder_fp32, 4),
            "encoder_bf16_s": None if encoder_bf16 is None else round(encoder_bf16, 4),
            "bf16_mask_iou": round(min(ious), 4) if ious else None,
            "bf16_mask_iou_mean": round(float(np.mean(ious)), 4) if ious else None,
            "bf16_over_fp32": None if encoder_bf16 is None else round(encoder_bf16 / encoder_fp32, 3)}


def _eager(engine: Engine, precision: str) -> Engine:
    """The same weights with the eager image encoder in `precision` (an engine that cannot choose: itself)."""
    plain = engine.with_encoder(None) if isinstance(engine, EncoderChoosing) else engine
    return plain.with_precision(precision) if isinstance(engine, PathChoosing) else plain


def cached_clicks(engine: Engine, image: np.ndarray, prompts: list[ObjectPrompt], refine_settings: RefineSettings,
                  repeats: int, click_repeats: int) -> dict[str, Any]:
    """A first click on a new image (encode + decode + refine), a click on a cached image, and the baseline that
    re-encodes at every click (fp32 eager), median seconds."""
    cache: EmbeddingCache = EmbeddingCache(1 << 30)
    width, height = image.shape[1], image.shape[0]

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
    fp32 = _eager(engine, "fp32")

    def reembed_click() -> None:
        pred = fp32.predict(fp32.embed(image), prompts[0])
        refine(pred.best_mask, prompts[0], refine_settings)

    log.info("re-embed baseline x%d", repeats)
    reembed = _median(reembed_click, repeats)
    return {"first_click_s": round(first_click, 4), "repeat_click_s": round(repeat_click, 4),
            "reembed_baseline_s": round(reembed, 4), "reembed_over_repeat": round(reembed / repeat_click, 1)}


def compare_decoders(engine: Engine, emb: Any, prompts: list[ObjectPrompt], kinds: tuple[str, ...],
                     click_repeats: int) -> dict[str, Any]:
    """Prompt encoder + mask decoder seconds per click for each decoder path `kinds`, side by side.

    Blocks of every prompt alternate between the paths (a short pause between blocks, so that one path's
    worker threads never run into the next one's block); each figure is the median per click. Paths that
    cannot be built here (onnxruntime missing, no compiler) are reported with the reason."""
    from sam_backend.segment.engines.fast_decoder import build_fast_decoder

    if not isinstance(engine, PathChoosing):  # not a torch engine: one path only
        return {"decoders": {}, "decoder_iou": {}, "decoder_speedup": {}, "decoder_errors": {}}
    predict_with = engine.predict_with
    runners: dict[str, Any] = {}
    errors: dict[str, str] = {}
    ious: dict[str, float] = {}
    graph, example, random_emb = engine.decoder_graph()
    for kind in kinds:
        if kind == "eager":
            runners[kind] = None
            continue
        try:
            log.info("building the %s decoder", kind)
            runner = build_fast_decoder(kind, graph, example)
            ious[kind] = round(engine.compare_decoder(runner, random_emb), 5)  # also compiles every prompt shape
            runners[kind] = runner
        except Exception as exc:  # report, and measure the others
            errors[kind] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    for runner in runners.values():  # warm every path on these prompts
        for p in prompts:
            predict_with(runner, emb, p)
    times: dict[str, list[float]] = {k: [] for k in runners}
    rounds = max(3, click_repeats // 4)
    for _ in range(rounds):
        for kind, runner in runners.items():
            time.sleep(0.05)
            for _ in range(4):
                for p in prompts:
                    t0 = time.perf_counter()
                    predict_with(runner, emb, p)
                    times[kind].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    eager = medians.get("eager")
    return {
        "decoders": {k: round(v, 4) for k, v in medians.items()},
        "decoder_iou": ious,
        "decoder_speedup": {k: round(eager / v, 2) for k, v in medians.items() if eager and k != "eager"},
        "decoder_errors": errors,
    }


def click_stages(engine: Engine, emb: Any, prompts: list[ObjectPrompt], refine_settings: RefineSettings,
                 click_repeats: int) -> dict[str, float]:
    """Median seconds per click of each stage the backend runs after the cache lookup (see `serving.stages`)."""
    import orjson

    from sam_backend.labelstudio.brush import encode_brush

    times: dict[str, list[float]] = {k: [] for k in ("decoder", "upsample", "refine", "rle", "json")}
    for _ in range(max(1, click_repeats // len(prompts))):
        for p in prompts:
            t0 = time.perf_counter()
            pred = engine.predict(emb, p)
            t1 = time.perf_counter()
            raw = pred.best_mask
            t2 = time.perf_counter()
            mask = refine(raw, p, refine_settings)
            t3 = time.perf_counter()
            rle = encode_brush(mask)
            t4 = time.perf_counter()
            orjson.dumps({"results": [{"result": [{"value": {"format": "rle", "rle": rle}}]}]})
            t5 = time.perf_counter()
            for k, a, b in (("decoder", t0, t1), ("upsample", t1, t2), ("refine", t2, t3), ("rle", t3, t4),
                            ("json", t4, t5)):
                times[k].append(b - a)
    return {k: statistics.median(v) for k, v in times.items()}


def http_click(engine: Engine, image: np.ndarray, prompt: ObjectPrompt, click_repeats: int,
               refine_settings: RefineSettings) -> float:
    """Median seconds of a cached click as a Label Studio `/predict` request over HTTP on 127.0.0.1, through
    the real Flask app (threaded werkzeug server) with `engine`; the image is a local file."""
    import tempfile
    import threading
    from dataclasses import replace

    import cv2
    import requests
    from werkzeug.serving import make_server

    from sam_backend.commands.evaluate import CONFIG
    from sam_backend.config import Settings
    from sam_backend.labelstudio.context import keypoint_result
    from sam_backend.serving.app import create_app
    from sam_backend.serving.backend import SamBackend

    h, w = image.shape[:2]
    (x, y), = prompt.points[:1]
    body = {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=bench.png"}}], "label_config": CONFIG,
            "project": "1.0", "params": {"context": {"result": [keypoint_result(float(x), float(y), (w, h))]}}}
    with tempfile.TemporaryDirectory() as tmp:
        cv2.imwrite(f"{tmp}/bench.png", image[:, :, ::-1])
        settings = replace(Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": tmp, "SAM_METADATA_DB": f"{tmp}/s.db"}),
                           refine=refine_settings)
        backend = SamBackend(settings, engine_factory=lambda: engine)
        server = make_server("127.0.0.1", 0, create_app(settings, backend=backend, recorder=lambda _: None),
                             threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        try:
            with requests.Session() as session:
                first = session.post(url, json=body, timeout=600)  # encodes the image
                if first.status_code != 200:
                    raise RuntimeError(f"/predict answered {first.status_code}: {first.text[:200]}")
                return _median(lambda: session.post(url, json=body, timeout=60).raise_for_status(), click_repeats)
        finally:
            server.shutdown()
            server.server_close()
