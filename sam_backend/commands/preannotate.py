"""`sam-backend preannotate`: every rectangle a project (or a COCO file) already has becomes a mask.

Label Studio (`--project N`): for each task, the rectangles of its newest live annotation (`--from annotations`, the
default), of its newest prediction (`predictions`: a detector's boxes imported as predictions) or both, each sent as
a box prompt through the backend's own `/predict` path (the click path: embedding cache and shared store, refinement,
brush RLE), in-process or to a running backend (`--backend URL`). The masks of one task are posted as one Label
Studio prediction whose `model_version` names the model and the source (`<backend model_version>/boxes-from-<source>`);
a task that already has a prediction of that version is skipped (a second run adds nothing) unless `--overwrite`,
which replaces it. People's annotations are only read.

While one task is segmented, the next tasks' images are queued for encoding (`SAM_PRECOMPUTE_QUEUE` deep), so
decoding, refinement and the Label Studio calls run while the encoder works. A rotated rectangle, a label the brush
control lacks, an image that cannot be fetched, an empty mask, a Label Studio error after retries: each is counted
with its task id and reported at the end; the run goes on.

COCO (`--coco boxes.json --images DIR -o masks.json`): the same file with an RLE `segmentation` (pycocotools,
column-major) added to every annotation that has a `bbox` `[x, y, width, height]` in pixels.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import requests

from sam_backend.errors import ClientError
from sam_backend.labelstudio.boxes import task_rectangles
from sam_backend.labelstudio.labelconfig import parse_label_config, task_image_url

log = logging.getLogger(__name__)

LOOKAHEAD = 3  # tasks whose images are queued for encoding ahead of the one being segmented


class PreannotateError(ValueError):
    """The run cannot start (no such project, no brush control, unreadable COCO file); the message says why."""


@dataclass
class Report:
    """What a run did: counts, and every problem with its task (or COCO annotation) id."""

    tasks: int = 0
    predicted: int = 0
    already: int = 0  # skipped: a prediction of this model_version exists
    without_boxes: int = 0
    regions: int = 0
    masks: int = 0
    seconds: float = 0.0
    encoder_seconds: float | None = None
    model_version: str = ""
    problems: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, where: object, kind: str, detail: str) -> None:
        self.problems.append({"task": where, "problem": kind, "detail": detail[:300]})
        log.warning("task %s: %s (%s)", where, kind, detail[:300])

    def to_json(self) -> dict[str, Any]:
        counts = Counter(p["problem"] for p in self.problems)
        images = self.predicted or 0
        return {"model_version": self.model_version, "tasks": self.tasks, "predicted": self.predicted,
                "skipped_already_predicted": self.already, "without_rectangles": self.without_boxes,
                "rectangles": self.regions, "masks": self.masks, "seconds": round(self.seconds, 2),
                "images_per_s": round(images / self.seconds, 3) if self.seconds and images else None,
                "encoder_seconds": None if self.encoder_seconds is None else round(self.encoder_seconds, 2),
                "encoder_share": (round(self.encoder_seconds / self.seconds, 3)
                                  if self.encoder_seconds is not None and self.seconds else None),
                "problems_by_kind": dict(counts), "problems": self.problems}


class Segmenter(Protocol):
    """Answers `/predict` bodies: the backend in this process, or a running one over HTTP."""

    model_version: str

    def predict(self, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def open(self, body: Mapping[str, Any]) -> None: ...

    def encoder_seconds(self) -> float | None: ...

    def close(self) -> None: ...


class LocalSegmenter:
    """A `SamBackend` in this process (the configured engine, cache and shared store; no sidecar rows)."""

    def __init__(self, settings: Any) -> None:
        from sam_backend.serving.backend import SamBackend

        self.backend = SamBackend(settings)
        self.backend.start()
        self.backend.engine.get()  # load now: a model that cannot load stops the run before any task
        self.model_version = self.backend.model_version
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="fetch-ahead")
        self._opened: set[str] = set()

    def predict(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.backend.predict(body)

    def open(self, body: Mapping[str, Any]) -> None:
        """Download the task's image on a thread of its own, then queue its encode: the encoder never waits for a
        download (measured: the encoder was idle 21 % of a run while it fetched each image itself)."""
        config = parse_label_config(body.get("label_config") or "")
        url = task_image_url((body.get("tasks") or [{}])[0], config.targets[0].value_key)
        if not url or url in self._opened:
            return
        self._opened.add(url)

        def fetch_then_queue() -> None:
            self.backend.fetch_ahead(url)
            self.backend.predict(_opening(body))

        self._ahead.submit(fetch_then_queue)

    def encoder_seconds(self) -> float | None:
        return self.backend.encoder.total_s

    def close(self) -> None:
        self._ahead.shutdown(wait=False, cancel_futures=True)


class RemoteSegmenter:
    """A running backend (or the nginx in front of replicas) at `url`: the same bodies over HTTP."""

    def __init__(self, url: str, timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.timeout_s = timeout_s
        try:
            health = self.http.get(self.url + "/health", timeout=10).json()
        except (requests.RequestException, ValueError) as exc:
            raise PreannotateError(f"--backend {self.url}: expected a sam-backend answering /health, got {exc}"
                                   ) from None
        self.model_version = str(health.get("model_version") or "sam-backend")

    def predict(self, body: Mapping[str, Any]) -> dict[str, Any]:
        for attempt in range(5):
            resp = self.http.post(self.url + "/predict", json=body, timeout=self.timeout_s)
            if resp.status_code == 503 and attempt < 4:  # still encoding or loading: it said to ask again
                time.sleep(1.0 + attempt)
                continue
            break
        try:
            answer = resp.json()
        except ValueError:
            answer = {}
        if resp.status_code >= 400:
            message = "; ".join(answer.get("errors") or []) or resp.text[:200]
            raise ClientError(message, resp.status_code)
        return answer

    def open(self, body: Mapping[str, Any]) -> None:
        try:
            self.http.post(self.url + "/predict", json=_opening(body), timeout=30)
        except requests.RequestException as exc:
            log.debug("queueing an image at %s failed: %s", self.url, exc)

    def encoder_seconds(self) -> float | None:
        return None

    def close(self) -> None:
        self.http.close()


def _opening(body: Mapping[str, Any]) -> dict[str, Any]:
    """`body` as a task-opened request (no context) whose tasks carry no regions: the backend only queues the
    images for encoding (with regions it would answer their masks at once, as for Retrieve Predictions)."""
    tasks = [{**t, "annotations": [], "predictions": []} for t in body.get("tasks") or []]
    return {**body, "tasks": tasks, "params": {"context": None}}


def retrying(call: Callable[[], requests.Response], what: str, attempts: int = 4) -> requests.Response:
    """`call()` again after a 429 or 5xx (or a connection error), backing off 1, 2, 4 s; the last answer or error
    stands (`RuntimeError` naming `what` and the status)."""
    for attempt in range(attempts):
        try:
            resp = call()
        except requests.RequestException as exc:
            if attempt == attempts - 1:
                raise RuntimeError(f"{what}: {type(exc).__name__}: {exc}") from None
        else:
            if resp.status_code < 400:
                return resp
            if resp.status_code != 429 and resp.status_code < 500 or attempt == attempts - 1:
                raise RuntimeError(f"{what}: HTTP {resp.status_code} {resp.text[:200]}")
        time.sleep(2 ** attempt)
    raise RuntimeError(what)  # not reached


def problem_kind(exc: ClientError) -> str:
    """How a refused box is reported: `image` (it cannot be fetched or read), `no mask`, `backend busy`, `backend`."""
    from sam_backend.labelstudio.images import ImageError

    if exc.status == 503:
        return "backend busy"
    if isinstance(exc, ImageError) or exc.status in (403, 404, 413, 424, 502, 504) or "image" in exc.message[:40]:
        return "image"
    return "no mask" if exc.status == 422 else "backend"


def preannotate_project(ls: Any, project: int, segmenter: Segmenter, *, source: str = "annotations",
                        overwrite: bool = False, progress: bool = True) -> Report:
    """Turn every rectangle of project `project` into a mask prediction (see the module docstring). `ls` is a
    `LabelStudioClient`."""
    try:
        config = ls.project(project).get("label_config") or ""
        tasks = ls.tasks(project, fields="all")
    except (RuntimeError, requests.RequestException, ClientError) as exc:
        raise PreannotateError(f"reading project {project} from {ls.url} failed: {exc}") from None
    target = parse_label_config(config).targets[0]
    version = f"{segmenter.model_version}/boxes-from-{source}"
    report = Report(tasks=len(tasks), model_version=version)
    t0 = time.perf_counter()
    work = [t for t in tasks if isinstance(t, Mapping)]
    bar = _bar(len(work), progress)
    try:
        for i, task in enumerate(work):
            for ahead in work[i + 1:i + 1 + LOOKAHEAD]:  # only images that will be needed, each once
                if (task_image_url(ahead, target.value_key) and not _done(ahead, version, overwrite)
                        and task_rectangles(ahead, source, own_versions={version})):
                    segmenter.open(_body(ahead, config, project, None))
            _one_task(ls, task, config, project, target, segmenter, version, source, overwrite, report)
            report.seconds = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(regions=report.regions, masks=report.masks,
                            img_s=f"{report.predicted / report.seconds:.2f}" if report.seconds else "-")
    finally:
        bar.close()
        segmenter.close()
    report.seconds = time.perf_counter() - t0
    report.encoder_seconds = segmenter.encoder_seconds()
    return report


def _bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="task", desc="preannotate", disable=not enabled)


def _body(task: Mapping[str, Any], config: str, project: int, context: Any) -> dict[str, Any]:
    return {"tasks": [task], "label_config": config, "project": f"{project}.0", "params": {"context": context}}


def _mine(task: Mapping[str, Any], version: str) -> list[Mapping[str, Any]]:
    """The task's predictions of `version` (an earlier run's)."""
    return [p for p in task.get("predictions") or [] if isinstance(p, Mapping) and p.get("model_version") == version]


def _done(task: Mapping[str, Any], version: str, overwrite: bool) -> bool:
    return not overwrite and bool(_mine(task, version))


def _one_task(ls: Any, task: Mapping[str, Any], config: str, project: int, target: Any, segmenter: Segmenter,
              version: str, source: str, overwrite: bool, report: Report) -> None:
    tid = task.get("id")
    mine = _mine(task, version)
    if mine and not overwrite:
        report.already += 1
        return
    rects = task_rectangles(task, source, own_versions={version})
    if not rects:
        report.without_boxes += 1
        return
    results, scores = [], []
    for n, rect in enumerate(rects):
        report.regions += 1
        why = rect.unusable(target.labels, target.output)
        if why is not None:
            report.problem(tid, *why)
            continue
        try:
            answer = segmenter.predict(_body(task, config, project, {"result": [rect.as_context(n)]}))
        except ClientError as exc:
            kind = problem_kind(exc)
            report.problem(tid, kind, f"region {rect.region_id}: HTTP {exc.status}: {exc.message}")
            if kind == "image":
                return  # the task's image cannot be had: its other boxes would fail the same way
            continue
        except requests.RequestException as exc:
            report.problem(tid, "backend", f"region {rect.region_id}: {type(exc).__name__}: {exc}")
            continue
        first = (answer.get("results") or [{}])[0]
        got = first.get("result") or []
        for r in got:  # an unlabeled box's mask carries the brush control's first label (the backend's rule)
            results.append({**r, "id": f"{rect.region_id or n}-mask"})
            scores.append(float(first.get("score") or 0.0))
        report.masks += len(got)
    if not results:
        return
    body = {"task": tid, "project": project, "result": results, "score": float(np.mean(scores)),
            "model_version": version}
    try:
        retrying(lambda: ls.call("POST", "/api/predictions/", json=body, check=False), f"saving task {tid}'s masks")
        for old in mine:  # --overwrite: the new prediction is saved, the old one of this version goes
            retrying(lambda old=old: ls.call("DELETE", f"/api/predictions/{old['id']}/", check=False),
                     f"replacing task {tid}'s earlier masks")
    except RuntimeError as exc:
        report.problem(tid, "label studio", str(exc))
        return
    report.predicted += 1


# -- COCO ---------------------------------------------------------------------------------------------------------
def preannotate_coco(coco_path: Path, images: Path, out: Path, settings: Any, progress: bool = True) -> Report:
    """Write `out`: the COCO file `coco_path` with an RLE `segmentation` added to each box annotation (see the module
    docstring); images are read from `images` by each image's `file_name`."""
    from dataclasses import replace

    from sam_backend.segment.masks import mask_to_rle

    try:
        coco = json.loads(coco_path.read_text())
        image_list, annotations = coco["images"], coco["annotations"]
        by_id = {im["id"]: im for im in image_list}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreannotateError(f"{coco_path}: expected a COCO file with images and annotations ({exc})") from None
    settings = replace(settings, local_files_root=images.resolve())
    segmenter = LocalSegmenter(settings)
    engine = segmenter.backend.engine.get()
    report = Report(tasks=len(image_list), model_version=f"{segmenter.model_version}/boxes-from-coco")
    groups: dict[Any, list[dict]] = {}
    for ann in annotations:
        if isinstance(ann, dict) and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
            groups.setdefault(ann.get("image_id"), []).append(ann)
    t0 = time.perf_counter()
    bar = _bar(len(groups), progress)
    order = list(groups)
    backend = segmenter.backend
    try:
        for i, image_id in enumerate(order):
            for ahead in order[i + 1:i + 1 + LOOKAHEAD]:
                name = by_id.get(ahead, {}).get("file_name")
                if name:
                    backend.prewarm.schedule(_local_url(name))
            meta = by_id.get(image_id)
            anns = groups[image_id]
            report.regions += len(anns)
            if meta is None or not meta.get("file_name"):
                report.problem(image_id, "image", "no entry with a file_name in images")
                continue
            try:
                image_key, embedding, _ = backend.embedding(_local_url(meta["file_name"]), engine)
            except ClientError as exc:
                report.problem(image_id, "image", f"{meta['file_name']}: {exc.message}")
                continue
            w, h = embedding.image_size
            for ann in anns:
                mask = _box_mask(backend, engine, embedding, image_key, ann, (w, h), report)
                if mask is None:
                    continue
                ann["segmentation"] = mask_to_rle(mask)
                ann.setdefault("area", float(mask.sum()))
                report.masks += 1
            report.predicted += 1
            bar.update(1)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.encoder_seconds = backend.encoder.total_s
    from sam_backend.fileio import write_atomic

    write_atomic(out, json.dumps(coco).encode())
    return report


def _local_url(file_name: str) -> str:
    from urllib.parse import quote

    return f"/data/local-files/?d={quote(file_name)}"


def _box_mask(backend: Any, engine: Any, embedding: Any, image_key: str, ann: dict, size: tuple[int, int],
              report: Report) -> np.ndarray | None:
    """The refined mask of one COCO box, or None (counted) where the box is unusable or the mask empty."""
    from sam_backend.segment.prompts import ObjectPrompt
    from sam_backend.serving.stages import StageTimes

    try:
        x, y, bw, bh = (float(v) for v in ann["bbox"])
    except (TypeError, ValueError):
        report.problem(ann.get("id"), "bad box", f"bbox {ann.get('bbox')!r}: expected [x, y, width, height]")
        return None
    w, h = size
    box = np.array([max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)], np.float32)
    if bw <= 0 or bh <= 0 or box[2] <= box[0] or box[3] <= box[1]:
        report.problem(ann.get("id"), "bad box", f"bbox {ann['bbox']} is empty or outside the {w}×{h} image")
        return None
    prompt = ObjectPrompt(np.zeros((0, 2)), np.zeros(0), box, str(ann.get("category_id")), None, None, (w, h))
    mask, _ = backend.segment_prompt(engine, embedding, image_key, prompt, StageTimes())
    if not mask.any():
        report.problem(ann.get("id"), "no mask", "the model found no object in this box")
        return None
    return mask

