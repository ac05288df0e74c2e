"""Export throughput: N tasks × K brush masks at W × H → COCO RLE + PNG masks.

Prints one JSON object: seconds for the export with all CPUs and with one process (the baseline,
same input, same run), tasks per second, and the input size. Target (issue 4): 1,000 × 5 at
1024 × 768 in ≤ 60 s on this machine.

    .venv/bin/python benchmarks/bench_export.py --tasks 1000 --masks 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from sam_backend.labelstudio.results import mask_to_brush
from sam_backend.sidecar.export import ExportOptions, export

log = logging.getLogger("bench_export")


def make_tasks(n_tasks: int, n_masks: int, width: int, height: int, seed: int = 0) -> list[dict]:
    """Tasks whose masks are ellipses (some with holes); 16 distinct masks are reused to keep set-up short."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(16):
        m = np.zeros((height, width), np.uint8)
        center = (int(rng.integers(100, width - 100)), int(rng.integers(100, height - 100)))
        axes = (int(rng.integers(30, 160)), int(rng.integers(30, 160)))
        cv2.ellipse(m, center, axes, float(rng.integers(0, 180)), 0, 360, 1, -1)
        if rng.random() < 0.5:
            cv2.circle(m, center, min(axes) // 3, 0, -1)
        pool.append(mask_to_brush(m.astype(bool)))
    tasks = []
    for t in range(n_tasks):
        results = [{"id": f"{t}-{k}", "type": "brushlabels", "from_name": "tag", "to_name": "image",
                    "original_width": width, "original_height": height,
                    "value": {"format": "rle", "rle": pool[(t * n_masks + k) % len(pool)],
                              "brushlabels": ["Cat" if k % 2 else "Dog"]}} for k in range(n_masks)]
        tasks.append({"id": t + 1, "data": {"image": f"/data/upload/1/{t:08x}-img{t}.png"},
                      "annotations": [{"id": t + 1, "result": results, "was_cancelled": False}]})
    return tasks


def timed_export(tasks: list[dict], jobs: int, work: Path) -> float:
    out = work / f"out-{jobs}"
    t0 = time.perf_counter()
    export(tasks, ["Cat", "Dog"], out, ExportOptions(masks=True, yolo=False, crops=False, jobs=jobs, progress=True))
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--masks", type=int, default=5)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--no-baseline", action="store_true", help="Skip the one-process run.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    tasks = make_tasks(args.tasks, args.masks, args.width, args.height)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "export.json"
        src.write_text(json.dumps(tasks))
        all_cpus = timed_export(json.loads(src.read_text()), 0, work)
        one = None if args.no_baseline else timed_export(json.loads(src.read_text()), 1, work)
    print(json.dumps({
        "tasks": args.tasks, "masks_per_task": args.masks, "image": [args.width, args.height],
        "cpus": os.cpu_count(), "export_s": round(all_cpus, 2),
        "export_one_process_s": None if one is None else round(one, 2),
        "speedup": None if one is None else round(one / all_cpus, 2),
        "masks_per_s": round(args.tasks * args.masks / all_cpus, 1), "target_s": 60,
    }))


if __name__ == "__main__":
    main()
