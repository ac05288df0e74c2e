"""What learning from accepted masks costs on this machine, and whether clicks feel it.

Runs the backend's own app in this process with `SAM_ADAPT=true` (the configured engine: SAM_CHECKPOINT, …), images
served from a dataset folder of the standard layouts (COCO-MVal's categories). In one run:

1. clicks on a photo of another category with nothing training: the median seconds per click (`idle_click_s`);
2. K accepted masks of one category as Label Studio's `ANNOTATION_CREATED` webhooks, then the same clicks while
   that project trains (`training_click_s`, and how many were answered: every one must be);
3. the training's seconds (embeddings, simulated prompts, steps, held-out check) per accepted mask, the version's
   held-out scores, and the process's peak RSS before and after (`peak_rss_mb_*`).

Label Studio's annotation API is stood in by the tests' loopback server (`tests/ls_standin.py`): the backend reads each
webhook's annotation back from it, as it does from Label Studio. Prints one JSON object with the CPU.

    SAM_CHECKPOINT=checkpoints/mobile_sam.pt .venv/bin/python benchmarks/bench_adapt.py \\
        ../shared/evaldata/COCO_MVal_A --category kite --masks 10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sam_backend.commands.bench import cpu_info
from sam_backend.commands.evalsets import detect_layout, load_objects
from sam_backend.commands.evaluate import CONFIG, LABEL
from sam_backend.config import Settings
from sam_backend.labelstudio.context import keypoint_result
from sam_backend.segment.simulator import first_click


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a dataset folder (COCO-MVal's img/gt layout gives categories)")
    ap.add_argument("--category", default="kite")
    ap.add_argument("--masks", type=int, default=10, help="accepted masks of the category (K)")
    ap.add_argument("--clicks", type=int, default=20, help="clicks timed idle and during the training")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from sam_backend.serving.app import create_app

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from ls_standin import LabelStudioStandIn, brush_region

    ls = LabelStudioStandIn()

    objects = load_objects(args.data)
    accepted = [o for o in objects if o.category == args.category][:args.masks]
    other = next(o for o in objects if o.category != args.category)
    root = args.data / detect_layout(args.data).images
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SAM_ADAPT": "true", "SAM_ADAPTER_DIR": str(Path(tmp) / "adapters"),
               "LOCAL_FILES_DOCUMENT_ROOT": str(root), "SAM_METADATA_DB": str(Path(tmp) / "sidecar.db"),
               "SAM_ADAPT_MIN_MASKS": str(args.masks), **ls.env()}
        client = create_app(Settings.from_env(env)).test_client()
        h, w = other.mask.shape
        x, y, _ = first_click(other.mask)
        body = {"tasks": [{"id": 1, "data": {"image": other.image}}], "label_config": CONFIG, "project": "2",
                "params": {"context": {"result": [keypoint_result(x, y, (w, h), True, LABEL)]}}}

        def timed_clicks() -> tuple[list[float], int]:
            seconds, ok = [], 0
            for _ in range(args.clicks):
                t0 = time.perf_counter()
                ok += client.post("/predict", json=body).status_code == 200
                seconds.append(time.perf_counter() - t0)
                time.sleep(0.5)  # an annotator's pace: the training runs between clicks
            return seconds, ok

        client.post("/setup", json={"project": "1.1700000000"})  # as Label Studio does when it connects
        timed_clicks()  # the model loads, the photo is encoded
        idle, idle_ok = timed_clicks()
        rss_before = rss_mb()
        t0 = time.perf_counter()
        for n, obj in enumerate(accepted, start=1):
            client.post("/webhook", json=ls.annotate(1, n, obj.image, regions=[brush_region(f"m{n}", obj.mask,
                                                                                           label=LABEL)]))
        while client.get("/health").json["adapt"]["projects"]["1"]["state"] != "training":
            time.sleep(0.05)
        during, during_ok = timed_clicks()
        while True:
            status = client.get("/health").json["adapt"]["projects"]["1"]
            if status["state"] == "idle" and (status["version"] or status["last_attempt"]):
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        attempt = status["last_attempt"] or {}
        health = client.get("/health").json["adapt"]
    ls.stop()
    print(json.dumps({
        "cpu": cpu_info(), "category": args.category, "accepted_masks": len(accepted),
        "trained_on": attempt.get("trained_on"), "held_out": attempt.get("held_out_objects"),
        "version_kept": bool(status["version"]), "held_out_base": attempt.get("base"),
        "held_out_adapted": attempt.get("adapted"), "training_s": attempt.get("seconds"),
        "training_s_per_accepted_mask": round(attempt.get("seconds", 0) / len(accepted), 2),
        "wall_s_webhooks_to_version": round(wall, 1), "steps": attempt.get("steps"),
        "idle_click_s": round(statistics.median(idle), 4), "training_click_s": round(statistics.median(during), 4),
        "click_ratio": round(statistics.median(during) / statistics.median(idle), 2),
        "clicks_answered": f"{idle_ok + during_ok}/{2 * args.clicks}", "paused_steps": health["paused_steps"],
        "peak_rss_mb_before": round(rss_before), "peak_rss_mb_after": round(rss_mb())}, indent=1))


if __name__ == "__main__":
    main()
