"""A click whose embedding comes from the shared tier (Redis, or the directory tier) against one from the process.

ViT-B and SAM 2.1 Hiera-T with seeded random weights (every SAM 2.1 size stores the same feature shapes:
256×64×64, 32×256×256, 64×128×128, so Hiera-T stands for the largest), a 1024 × 768 image, a real
`redis-server` on 127.0.0.1 (temporary, stopped at the end) and a directory in a temporary folder. For each
engine and tier, in one run, medians over `--clicks` clicks through `SamBackend.predict` (the whole click:
decoder, upsampling, refinement, RLE):
- `cached_click_s`: the embedding in the process (the usual case);
- `store_click_s`: the process cache emptied before each click, so the embedding is read from the tier
  (float16 bytes, crc32 checked, to float32) — what a replica that did not encode the image pays;
- `tier_overhead_s` = store − cached (target: ≤ 0.05 s); `decoder_s`: the decoder alone; `stored_mb`.

    .venv/bin/python benchmarks/bench_store.py
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from services import Redis  # noqa: E402

from sam_backend.commands.bench import cpu_info  # noqa: E402
from sam_backend.config import Settings  # noqa: E402
from sam_backend.labelstudio.context import keypoint_result  # noqa: E402
from sam_backend.segment.samples import bench_image, bench_prompts  # noqa: E402
from sam_backend.serving.backend import SamBackend  # noqa: E402

W, H = 1024, 768
CONFIG = (Path(__file__).resolve().parents[1] / "label_config" / "points-and-boxes-brush.xml").read_text()


def body(x: float, y: float) -> dict:
    return {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=img.png"}}], "label_config": CONFIG,
            "project": "1.0", "params": {"context": {"result": [keypoint_result(x, y, (W, H))]}}}


def engine_for(model: str):  # noqa: ANN201 - an Engine
    from sam_backend.segment.engines.sam import SamEngine
    from sam_backend.segment.engines.sam2 import Sam2Engine

    settings = Settings.from_env()
    cls = SamEngine if model.startswith("vit") else Sam2Engine
    engine = cls.random(model, device=settings.device, precision=settings.precision)
    engine.use_decoder(settings.decoder)
    return engine


def measure(engine, root: Path, store_url: str, clicks: int) -> dict:  # noqa: ANN001
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(root), "SAM_EMBEDDING_STORE": store_url,
                                  "SAM_METADATA_DB": str(root / "s.db")})
    backend = SamBackend(settings, engine_factory=lambda: engine, recorder=lambda _: None)
    click = body(W / 3, H / 2)
    backend.predict(click)  # encodes, stores
    cached, stored = [], []
    for _ in range(clicks):
        backend.memory.objects._logits.clear()  # every click a first click on its object
        t0 = time.perf_counter()
        backend.predict(click)
        cached.append(time.perf_counter() - t0)
        backend.cache.clear()
        backend.memory.objects._logits.clear()
        t0 = time.perf_counter()
        backend.predict(click)
        stored.append(time.perf_counter() - t0)
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in backend.metrics.render().decode().splitlines()
               if line.startswith('sam_store_total{result="hit"}'))
    assert hits >= clicks, f"expected every emptied-cache click to read the store, got {hits} hits"
    return {"cached_click_s": round(statistics.median(cached), 4), "store_click_s": round(statistics.median(stored), 4),
            "tier_overhead_s": round(statistics.median(stored) - statistics.median(cached), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="vit_b, sam2.1_hiera_tiny (default both)")
    parser.add_argument("--clicks", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = bench_image(W, H)
        cv2.imwrite(str(root / "img.png"), image[:, :, ::-1])
        redis = Redis(root / "redis", maxmemory_mb=1024).start()
        try:
            for model in args.model or ["vit_b", "sam2.1_hiera_tiny"]:
                engine = engine_for(model)
                emb = engine.embed(image)
                prompt = bench_prompts(W, H)[0]
                decoder = []
                for _ in range(args.clicks):
                    t0 = time.perf_counter()
                    engine.predict(emb, prompt)
                    decoder.append(time.perf_counter() - t0)
                row = {"model": model, "decoder": engine.decoder_kind, "precision": engine.precision,
                       "decoder_s": round(statistics.median(decoder), 4),
                       "stored_mb": round(len(engine.dump(emb, compact=True)) / 2**20, 2)}
                for name, url in (("redis", redis.url), ("file", f"file://{root / 'tier' / model}")):
                    row[name] = measure(engine, root, url, args.clicks)
                results.append(row)
        finally:
            redis.stop()
    print(json.dumps({**cpu_info(), "image": [W, H], "clicks": args.clicks, "results": results}))


if __name__ == "__main__":
    main()
