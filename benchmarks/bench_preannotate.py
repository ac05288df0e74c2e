"""`sam-backend preannotate` on real photos through the real Label Studio: box → mask quality and throughput.

Starts Label Studio (127.0.0.1, temporary data dir, stopped at the end), uploads the photos of a shared set that has
ground truth (GrabCut or Berkeley layout), draws one rectangle per object (its ground truth's bounding box) as an
annotation, runs `preannotate` in this process with the configured engine (SAM_ENGINE, SAM_CHECKPOINT, …), then
reads the predictions back from Label Studio. In the same run the encoder alone encodes the same photos back to back.

Prints one JSON object: `images_per_s` (preannotate), `encoder_images_per_s` (the encoder alone) and their ratio
`throughput_vs_encoder` (target ≥ 0.9: decoding, refinement and the Label Studio calls hidden behind the encodes),
`encoder_share` (encode seconds ÷ run seconds), `mean_iou` / `median_iou` of the masks against the objects (the box
protocol's first-interaction IoU, through the product's whole path), the CPU.

    SAM_ENGINE=sam SAM_CHECKPOINT=checkpoints/mobile_sam.pt .venv/bin/python benchmarks/bench_preannotate.py \\
        ../shared/evaldata/GrabCut
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from sam_backend.commands.bench import cpu_info
from sam_backend.commands.evalsets import detect_layout, load_objects
from sam_backend.commands.preannotate import LocalSegmenter, preannotate_project
from sam_backend.config import Settings
from sam_backend.labelstudio.process import LabelStudio
from sam_backend.segment.simulator import iou

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="object"/></RectangleLabels>
</View>"""


def rectangle(mask: np.ndarray, rid: str) -> dict:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return {"id": rid, "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w, "height": 100 * (y1 - y0) / h,
                      "rotation": 0, "rectanglelabels": ["object"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a shared set folder (GrabCut, Berkeley)")
    parser.add_argument("--limit", type=int, default=50, help="photos (one object each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    layout = detect_layout(args.data)
    objects = load_objects(args.data, limit=args.limit)
    folder = args.data / layout.images
    with tempfile.TemporaryDirectory() as tmp:
        ls = LabelStudio(Path(tmp) / "ls", "bench@example.com", "bench-Passw0rd-1").start()
        try:
            pid = ls.create_project("preannotate", CONFIG)
            ids = ls.upload(pid, {o.image: (folder / o.image).read_bytes() for o in objects})
            truth = {}
            for tid in ids:
                name = ls.task(tid)["data"]["image"].rsplit("/", 1)[-1]
                obj = next(o for o in objects if name.endswith(o.image))
                ls.call("POST", f"/api/tasks/{tid}/annotations/", json={"result": [rectangle(obj.mask, "r1")]})
                truth[tid] = (obj.mask, obj.ignore)
            settings = Settings.from_env()
            from dataclasses import replace

            settings = replace(settings, label_studio_url=ls.url, label_studio_api_key=ls.pat)
            segmenter = LocalSegmenter(settings)
            engine = segmenter.backend.engine.get()
            report = preannotate_project(ls, pid, segmenter, progress=False).to_json()
            ious = []
            for tid, (mask, ignore) in truth.items():
                preds = [p for p in ls.task(tid)["predictions"] if p["model_version"] == report["model_version"]]
                if not preds or not preds[0]["result"]:
                    ious.append(0.0)
                    continue
                r = preds[0]["result"][0]
                rgba = np.array(decode_rle(r["value"]["rle"]), np.uint8).reshape(r["original_height"],
                                                                                 r["original_width"], 4)
                ious.append(iou(rgba[..., 3] > 0, mask, ignore))
            images = [np.asarray(Image.open(folder / o.image).convert("RGB")) for o in objects]
            engine.embed(images[0])
            t0 = time.perf_counter()
            for image in images:
                engine.embed(image)
            encoder_rate = len(images) / (time.perf_counter() - t0)
        finally:
            ls.stop()
    print(json.dumps({
        "data": str(args.data), "photos": len(objects), "model_version": report["model_version"],
        "encoder": getattr(engine, "encoder_kind", "-"), "decoder": getattr(engine, "decoder_kind", "-"), **cpu_info(),
        "images_per_s": report["images_per_s"], "encoder_images_per_s": round(encoder_rate, 3),
        "throughput_vs_encoder": round(report["images_per_s"] / encoder_rate, 3) if report["images_per_s"] else None,
        "encoder_share": report["encoder_share"], "seconds": report["seconds"],
        "mean_iou": round(float(np.mean(ious)), 4), "median_iou": round(float(np.median(ious)), 4),
        "problems": report["problems_by_kind"],
    }))


if __name__ == "__main__":
    main()
