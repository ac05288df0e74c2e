"""The PostgreSQL sidecar under load: 100,000 interaction rows written while clicks run, then `history`.

A real PostgreSQL (Debian's binaries, a temporary cluster on 127.0.0.1, stopped at the end). The rows go
through the backend's own writer (`AsyncRecorder` on `PostgresStore`, one row per click, each with a COCO RLE
mask as the backend writes them), spread over 1,000 tasks, while a GrabCut backend answers clicks in this
process. Prints one JSON object: rows per second, the click median before and during the load (ratio), rows
lost, and the median of `history` for one task once 100,000 rows are in (target: ≤ 5 ms).

    .venv/bin/python benchmarks/bench_pg.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from services import Postgres  # noqa: E402

from sam_backend.commands.bench import cpu_info  # noqa: E402
from sam_backend.config import Settings  # noqa: E402
from sam_backend.labelstudio.context import keypoint_result  # noqa: E402
from sam_backend.segment.engines.grabcut import GrabCutEngine  # noqa: E402
from sam_backend.segment.samples import bench_image  # noqa: E402
from sam_backend.serving.backend import SamBackend  # noqa: E402
from sam_backend.sidecar.postgres import PostgresStore  # noqa: E402
from sam_backend.sidecar.records import Interaction  # noqa: E402
from sam_backend.sidecar.store import AsyncRecorder  # noqa: E402

W, H = 640, 480
CONFIG = (Path(__file__).resolve().parents[1] / "label_config" / "points-and-boxes-brush.xml").read_text()


def click_body() -> dict:
    return {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=img.png"}}], "label_config": CONFIG,
            "project": "1.0", "params": {"context": {"result": [keypoint_result(W / 3, H / 2, (W, H))]}}}


def row(i: int, mask: np.ndarray) -> Interaction:
    return Interaction(image_id=f"{i % 5000:064x}", prompt={"points": [[float(i % W), 10.0]], "labels": [1],
                                                            "box": None},
                       mask=mask, project="1", task_id=i % 1000, image_url="/data/upload/1/x.png", engine="sam/b/fp32",
                       model_version="bench", label="Object", score=0.9, latency_ms=50.0, cache_hit=True,
                       request_key=f"bench-{i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cv2.imwrite(str(root / "img.png"), bench_image(W, H)[:, :, ::-1])
        pg = Postgres(root / "pg").start()
        try:
            store = PostgresStore(pg.url)
            recorder = AsyncRecorder(store, max_pending=args.rows + 10)
            lost: list[str] = []
            recorder.on_lost = lost.append
            settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(root), "SAM_ENGINE": "grabcut",
                                          "SAM_METADATA_DB": str(root / "unused.db")})
            backend = SamBackend(settings, engine_factory=GrabCutEngine, recorder=lambda _: None)
            backend.predict(click_body())

            def clicks(n: int) -> list[float]:
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    backend.predict(click_body())
                    times.append(time.perf_counter() - t0)
                return times

            before = clicks(30)
            mask = np.zeros((H, W), bool)
            mask[100:300, 150:400] = True
            done = threading.Event()

            def load() -> None:
                for i in range(args.rows):
                    recorder(row(i, mask))
                recorder.flush(3600)
                done.set()

            t0 = time.perf_counter()
            threading.Thread(target=load, daemon=True).start()
            during: list[float] = []
            while not done.is_set():
                during.extend(clicks(5))
            write_s = time.perf_counter() - t0
            count = store.count()
            history = []
            for task in range(0, 1000, 37):
                t1 = time.perf_counter()
                rows = store.history(task=task)
                history.append(time.perf_counter() - t1)
                assert len(rows) == args.rows // 1000
        finally:
            pg.stop()
    print(json.dumps({
        **cpu_info(), "rows": args.rows, "rows_kept": count, "rows_lost": len(lost),
        "write_s": round(write_s, 1), "rows_per_s": round(args.rows / write_s),
        "click_before_s": round(statistics.median(before), 4), "click_during_s": round(statistics.median(during), 4),
        "clicks_during": len(during),
        "click_during_over_before": round(statistics.median(during) / statistics.median(before), 2),
        "history_one_task_s": round(statistics.median(history), 5), "history_rows": args.rows // 1000,
    }))


if __name__ == "__main__":
    main()
