"""Server latency: `/predict` over HTTP on a cached image against the bare decoder, and `/health`
while the encoder runs.

ViT-B with seeded random weights (timing does not depend on them) behind the real Flask app on a
threaded server on 127.0.0.1. Prints one JSON object of medians (and the p99 of `/health`).
Targets (issue 3): `predict_http_s` ≤ `decode_s` + 0.05; `health_p99_s` < 0.1 while encoding.

    .venv/bin/python benchmarks/bench_server.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import cv2
import requests
from werkzeug.serving import make_server

from sam_backend.config import Settings
from sam_backend.labelstudio.context import keypoint_result
from sam_backend.segment.engines.sam import SamEngine
from sam_backend.segment.samples import bench_image, bench_prompts
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend

CONFIG = (Path(__file__).resolve().parents[1] / "label_config" / "points-and-boxes-brush.xml").read_text()


def click_body(name: str, x: float, y: float, w: int, h: int) -> dict:
    return {"tasks": [{"id": 1, "data": {"image": f"/data/local-files/?d={name}"}}], "label_config": CONFIG,
            "project": "1.0", "params": {"context": {"result": [keypoint_result(x, y, (w, h))]}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--encodes", type=int, default=2)
    args = parser.parse_args()
    w, h = 1024, 768
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.encodes + 1):
            cv2.imwrite(str(root / f"img{i}.png"), bench_image(w, h, seed=i)[:, :, ::-1])
        settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(root), "SAM_METADATA_DB": str(root / "s.db")})
        engine = SamEngine.random(args.model_type)
        backend = SamBackend(settings, engine_factory=lambda: engine)
        server = make_server("127.0.0.1", 0, create_app(settings, backend=backend), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        http = requests.Session()
        x, y = w / 3, h / 2
        assert http.post(url + "/predict", json=click_body("img0.png", x, y, w, h), timeout=300).status_code == 200

        emb = engine.embed(bench_image(w, h, seed=0))
        prompt = bench_prompts(w, h)[0]
        decode = []
        for _ in range(args.clicks):
            t0 = time.perf_counter()
            engine.predict(emb, prompt)
            decode.append(time.perf_counter() - t0)
        predict = []
        for _ in range(args.clicks):
            t0 = time.perf_counter()
            r = http.post(url + "/predict", json=click_body("img0.png", x, y, w, h), timeout=60)
            predict.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["results"][0]["result"], r.text[:200]

        health: list[float] = []
        done = threading.Event()

        def poll() -> None:
            s = requests.Session()
            while not done.is_set():
                t0 = time.perf_counter()
                assert s.get(url + "/health", timeout=5).status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        t_enc = time.perf_counter()
        for i in range(1, args.encodes + 1):
            http.post(url + "/predict", json=click_body(f"img{i}.png", x, y, w, h), timeout=300)
        t_enc = (time.perf_counter() - t_enc) / args.encodes
        done.set()
        poller.join()
        server.shutdown()
    health.sort()
    print(json.dumps({
        "model": args.model_type, "precision": engine.precision, "image": [w, h],
        "decode_s": round(statistics.median(decode), 4),
        "predict_http_s": round(statistics.median(predict), 4),
        "predict_overhead_s": round(statistics.median(predict) - statistics.median(decode), 4),
        "encode_click_s": round(t_enc, 2),
        "health_samples": len(health), "health_median_s": round(statistics.median(health), 4),
        "health_p99_s": round(health[min(len(health) - 1, int(0.99 * len(health)))], 4),
        "health_max_s": round(health[-1], 4),
    }))


if __name__ == "__main__":
    main()
