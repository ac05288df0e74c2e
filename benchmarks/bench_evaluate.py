"""`sam-backend evaluate` at scale: N objects × K clicks with SAM ViT-B (random weights), embeddings reused.

Synthetic scenes (10 images of 1024 × 768, several objects each) are written as a Label Studio export and
evaluated with the clicks protocol through the in-process backend. Prints one JSON object: total seconds,
seconds per click, encodes, the CPU. Target (issue "evaluate"): 100 objects × 20 clicks in ≤ 5 minutes.

    .venv/bin/python benchmarks/bench_evaluate.py --objects 100 --clicks 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lsexport import brush  # noqa: E402

from sam_backend.commands.bench import cpu_info  # noqa: E402
from sam_backend.commands.evalsets import load_objects  # noqa: E402
from sam_backend.commands.evaluate import Configuration, evaluate  # noqa: E402
from sam_backend.config import Settings  # noqa: E402
from sam_backend.segment.engines.sam import SamEngine  # noqa: E402


def scenes(n_objects: int, per_image: int, width: int, height: int, folder: Path) -> list[dict]:
    """Images with `per_image` filled shapes each, as a Label Studio export (one brush region per shape)."""
    rng = np.random.default_rng(0)
    tasks = []
    for i in range((n_objects + per_image - 1) // per_image):
        low = rng.integers(60, 180, size=(height // 32, width // 32, 3)).astype(np.uint8)
        image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        results = []
        for k in range(min(per_image, n_objects - i * per_image)):
            mask = np.zeros((height, width), np.uint8)
            cx, cy = int(width * (k + 1) / (per_image + 1)), int(height * (0.3 + 0.4 * (k % 2)))
            cv2.ellipse(mask, (cx, cy), (int(rng.integers(40, 90)), int(rng.integers(40, 90))), 0, 0, 360, 1, -1)
            image[mask > 0] = rng.integers(0, 255, 3)
            results.append(brush(mask.astype(bool), "Object", f"{i}-{k}"))
        cv2.imwrite(str(folder / f"img{i}.png"), image[:, :, ::-1])
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/1/img{i}.png"},
                      "annotations": [{"id": i + 1, "result": results, "was_cancelled": False}]})
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--model-type", default="vit_b")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        export = folder / "export.json"
        export.write_text(json.dumps(scenes(args.objects, args.per_image, 1024, 768, folder)))
        settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(folder), "SAM_METADATA_DB": f"{tmp}/s.db"})
        engine = SamEngine.random(args.model_type, device="cpu")
        objects = load_objects(export, folder)
        t0 = time.perf_counter()
        summary = evaluate(objects, [Configuration("vit_b", engine)], settings, folder / "out",
                           max_clicks=args.clicks)
        total = time.perf_counter() - t0
    s = summary["vit_b"]
    print(json.dumps({**cpu_info(), "model": args.model_type, "precision": engine.precision,
                      "objects": len(objects), "max_clicks": args.clicks, "total_s": round(total, 1),
                      "target_s": 300, "seconds_per_click": s["seconds_per_click"],
                      "seconds_first_click": s["seconds_first_click"], "noc90": s["noc90"]}))


if __name__ == "__main__":
    main()
