"""`sam-backend evaluate`: clicks-to-quality on labeled data, per model and settings, with a plot.

Data: a Label Studio JSON export (brush RLE or polygons; each task's newest live annotation) or a COCO file
(RLE or polygon segmentations). Images: `--images DIR` (matched by file name), else the URLs the tasks hold,
fetched by the backend's own image loader (Label Studio's with `LABEL_STUDIO_URL` + `LABEL_STUDIO_API_KEY`).

Each object is segmented by the simulator of `sam_backend.segment.simulator`, and every prompt goes through
the path of a real click: a Label Studio-shaped `/predict` body (percent coordinates; all keypoints so far,
newest last; a rectangle alone) → `SamBackend` (object memory, logits feedback, refinement) → the brush RLE
Label Studio would receive, decoded back to a mask. `--backend URL` sends the same bodies to a running backend.
Each object is its own task, so one object's memory never leaks into another's.

Protocols: `clicks` (the first click at the object's deepest point, then corrective clicks) and `box` (the
object's bounding box first, then corrective clicks; interaction 1 is the box). NoC@85 / NoC@90 count
interactions; an object that never reaches the IoU counts `max_clicks` and a failure.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import requests
from tqdm import tqdm

from sam_backend.commands.evalsets import EvalObject, EvaluateError
from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.brush import decode_brush
from sam_backend.labelstudio.context import keypoint_result
from sam_backend.segment.engines import Engine
from sam_backend.segment.prompts import PromptError
from sam_backend.segment.simulator import first_click, iou, mean_iou_curve, next_click, noc

log = logging.getLogger(__name__)

LABEL = "Object"
CONFIG = f"""<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="{LABEL}"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="{LABEL}"/></KeyPointLabels>
<RectangleLabels name="box" toName="image" smart="true"><Label value="{LABEL}"/></RectangleLabels></View>"""


@dataclass
class Configuration:
    """One way of answering: an engine (None with --backend), refinement and logits feedback on or off, and the
    protocol. `plain` is the model alone (no refinement), as upstream `SamPredictor` with the previous logits."""

    name: str
    engine: Engine | None  # None with --backend
    refine: bool = True
    logit_feedback: bool = True
    protocol: str = "clicks"


@dataclass
class ObjectRun:
    ious: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    refused: int = 0  # prompts answered 422 (the previous mask stayed)


REFUSED = object()  # what an asker returns for a prompt refused with 422


# -- one configuration --------------------------------------------------------------------------------------

def _rectangle(mask: np.ndarray) -> dict[str, Any]:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return {"original_width": w, "original_height": h, "type": "rectanglelabels", "from_name": "box",
            "to_name": "image", "value": {"x": x1 / w * 100, "y": y1 / h * 100, "width": (x2 - x1) / w * 100,
                                          "height": (y2 - y1) / h * 100, "rotation": 0, "rectanglelabels": [LABEL]}}


def _answer_mask(answer: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    regions = answer["results"][0]["result"] if answer.get("results") else []
    mask = np.zeros(shape, bool)
    for region in regions:
        m = decode_brush(region["value"]["rle"], region["original_width"], region["original_height"])
        if m.shape != shape:
            m = cv2.resize(m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        mask |= m
    return mask


def run_object(ask: Callable[[dict[str, Any]], Any], obj: EvalObject, task_id: int, protocol: str,
               max_clicks: int) -> ObjectRun:
    """IoU after each interaction of the simulator on one object; `ask(body)` is one `/predict` (its answer, or
    `REFUSED` for a 422: the previous mask stays, as it would on the annotator's screen, and is counted)."""
    h, w = obj.mask.shape
    run, clicks = ObjectRun(), []
    prediction = np.zeros((h, w), bool)
    for k in range(max_clicks):
        if k == 0 and protocol == "box":
            result = [_rectangle(obj.mask)]
        else:
            click = first_click(obj.mask) if k == 0 else next_click(prediction, obj.mask, obj.ignore)
            if click is None:
                break  # perfect: the curve keeps its last value
            clicks.append(click)
            result = [keypoint_result(x, y, (w, h), positive, LABEL) for x, y, positive in clicks]
        body = {"tasks": [{"id": task_id, "data": {"image": obj.image}}], "label_config": CONFIG,
                "project": "evaluate", "params": {"context": {"result": result}}}
        t0 = time.perf_counter()
        answer = ask(body)
        run.seconds.append(time.perf_counter() - t0)
        if answer is REFUSED:
            run.refused += 1
        else:
            prediction = _answer_mask(answer, (h, w))
        run.ious.append(iou(prediction, obj.mask, obj.ignore))
    return run


def in_process_asker(settings: Settings, config: Configuration, shared: dict[str, Any]) -> Callable:
    """`/predict` through a `SamBackend` in this process; backends of one engine share embeddings and images."""
    from sam_backend.serving.backend import SamBackend
    from sam_backend.serving.cache import EmbeddingCache
    from sam_backend.serving.memory import LOGITS_BYTES, ImageMemory, Memory, ObjectMemory

    engine = config.engine
    cache = shared.setdefault("cache", EmbeddingCache(settings.cache_mb * 1024 * 1024))
    objects = ObjectMemory(max_bytes=LOGITS_BYTES if config.logit_feedback else 0,
                           box_ttl_s=settings.object_memory_ttl_s)
    memory = Memory(images=shared.setdefault("images", ImageMemory()), objects=objects)
    backend = SamBackend(replace(settings, refine=replace(settings.refine, enabled=config.refine)),
                         engine_factory=lambda: engine, cache=cache, memory=memory)

    def ask(body: dict[str, Any]) -> Any:
        try:
            return backend.predict(body)
        except PromptError as exc:  # the server answers these 422 too
            log.debug("refused: %s", exc)
            return REFUSED
        except ClientError as exc:
            if exc.status == 422:  # refused, or the model found nothing
                log.debug("refused: %s", exc.message)
                return REFUSED
            raise EvaluateError(f"{body['tasks'][0]['data']['image']}: {exc.message}") from None

    return ask


def http_asker(url: str, settings: Settings, timeout_s: float = 600.0) -> Callable:
    """`/predict` against a running backend; waits through 'still encoding' answers."""
    session = requests.Session()
    if settings.basic_auth_user:
        session.auth = (settings.basic_auth_user, settings.basic_auth_pass or "")

    def ask(body: dict[str, Any]) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            r = session.post(url.rstrip("/") + "/predict", json=body, timeout=timeout_s)
            if r.status_code == 200:
                return r.json()
            if r.status_code == 422:  # refused (the message says why), or the model found nothing
                log.debug("refused: %s", r.text[:300])
                return REFUSED
            if r.status_code == 503 and "still encoding" in r.text and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise EvaluateError(f"{url}/predict answered HTTP {r.status_code}: {r.text[:300]}")

    return ask


# -- summary, CSV and plot ----------------------------------------------------------------------------------

def summarize(runs: list[ObjectRun], max_clicks: int, protocol: str) -> dict[str, Any]:
    curves = [r.ious for r in runs]
    n85 = [noc(c, 0.85, max_clicks) for c in curves]
    n90 = [noc(c, 0.90, max_clicks) for c in curves]
    later = [s for r in runs for s in r.seconds[1:]] or [s for r in runs for s in r.seconds]
    return {
        "objects": len(runs), "protocol": protocol,
        "noc85": round(float(np.mean([k for k, _ in n85])), 3), "noc90": round(float(np.mean([k for k, _ in n90])), 3),
        "failures85": sum(not ok for _, ok in n85), "failures90": sum(not ok for _, ok in n90),
        "miou": [round(v, 4) for v in mean_iou_curve(curves, max_clicks)],
        "box_iou": round(float(np.mean([c[0] for c in curves])), 4) if protocol == "box" else None,
        "refused": sum(r.refused for r in runs),
        "seconds_per_click": round(statistics.median(later), 4) if later else None,
        "seconds_first_click": round(float(np.mean([r.seconds[0] for r in runs])), 3),
    }


def write_outputs(out: Path, objects: list[EvalObject], results: dict[str, tuple[dict, list[ObjectRun]]],
                  max_clicks: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({name: s for name, (s, _) in results.items()}, indent=1))
    with open(out / "per_object.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["configuration", "object", "image", "category", "noc85", "noc90",
                         *[f"iou@{k}" for k in range(1, max_clicks + 1)]])
        for name, (_, runs) in results.items():
            for obj, run in zip(objects, runs, strict=True):
                curve = mean_iou_curve([run.ious], max_clicks)
                writer.writerow([name, obj.name, obj.image, obj.category, noc(run.ious, 0.85, max_clicks)[0],
                                 noc(run.ious, 0.90, max_clicks)[0], *[f"{v:.4f}" for v in curve]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, (summary, _) in results.items():
        plain = name.endswith("/plain")  # dashed, so a plain curve on top of the product's stays visible
        ax.plot(range(1, len(summary["miou"]) + 1), summary["miou"], marker="x" if plain else "o", markersize=3,
                linestyle="--" if plain else "-", label=f"{name} (NoC@90 {summary['noc90']:.2f})")
    ax.set_xlabel("interactions (clicks; with the box protocol the box is the first)")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.set_xlim(1, max_clicks)
    ax.grid(alpha=0.3)
    ax.set_title(f"mIoU vs clicks on {len(objects)} objects")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "miou_vs_clicks.png")
    plt.close(fig)


def evaluate(objects: list[EvalObject], configs: list[Configuration], settings: Settings, out: Path,
             max_clicks: int = 20, backend_url: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every configuration on every object; write summary.json, per_object.csv, miou_vs_clicks.png."""
    results: dict[str, tuple[dict, list[ObjectRun]]] = {}
    shared: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(objects) * len(configs), unit="object", desc="evaluate", disable=not progress)
    try:
        for config in configs:
            if backend_url:
                ask = http_asker(backend_url, settings)
            else:
                ask = in_process_asker(settings, config, shared.setdefault(config.engine.engine_id, {}))
            runs = []
            for i, obj in enumerate(objects):
                runs.append(run_object(ask, obj, i + 1, config.protocol, max_clicks))
                bar.update(1)
            results[config.name] = (summarize(runs, max_clicks, config.protocol), runs)
    finally:
        bar.close()
    write_outputs(out, objects, results, max_clicks)
    return {name: s for name, (s, _) in results.items()}
