"""`history` for one task over a sidecar of N rows (default 100,000).

Prints one JSON object with the median milliseconds of `Store.history(task=…)` and, as the
baseline measured in the same run, of the same query without the task index. Target (issue 4):
≤ 100 ms for one task over 100,000 rows.

    .venv/bin/python benchmarks/bench_history.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from sam_backend.sidecar.store import Store


def fill(path: Path, rows: int, tasks: int) -> None:
    Store(path)  # schema
    conn = sqlite3.connect(path)
    prompt = json.dumps({"points": [[10.0, 20.0, 1]], "box": None})
    coco = json.dumps({"segmentation": {"size": [768, 1024], "counts": "abc" * 40}, "area": 1234,
                       "bbox": [1, 2, 3, 4], "iscrowd": 0})
    batch = 10_000
    with tqdm(total=rows, unit="row", desc="insert") as bar:
        for start in range(0, rows, batch):
            data = [(f"2026-11-{1 + i % 28:02d}T00:00:{i % 60:02d}.000+00:00", str(i % 7), i % tasks, "ab" * 32,
                     "/data/upload/1/x.png", prompt, 10.0, 20.0, "null", "sam", "v", "Cat", 0.9, "[1,2,3,4]", 1234,
                     30.0, 1, coco) for i in range(start, min(rows, start + batch))]
            conn.executemany(
                "INSERT INTO interactions (created_at, project, task_id, image_id, image_url, prompt, click_x, click_y,"
                " bbox, engine, model_version, label, score, mask_bbox, mask_area, latency_ms, cache_hit,"
                " coco_annotation) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", data)
            conn.commit()
            bar.update(len(data))
    conn.close()


def median_ms(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=5_000, help="Distinct task ids (rows per task = rows / tasks).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.db"
        fill(path, args.rows, args.tasks)
        store = Store(path)
        task = args.tasks // 2
        indexed = median_ms(lambda: store.history(task=task))
        n = len(store.history(task=task))
        conn = sqlite3.connect(path)
        scan = median_ms(lambda: conn.execute("SELECT * FROM interactions NOT INDEXED WHERE task_id = ?",
                                              (task,)).fetchall(), 5)
    print(json.dumps({"rows": args.rows, "rows_for_task": n, "history_task_ms": round(indexed, 2),
                      "full_scan_baseline_ms": round(scan, 2), "speedup": round(scan / indexed, 1),
                      "target_ms": 100}))


if __name__ == "__main__":
    main()
