"""Label Studio annotations → COCO with real masks, PNG masks, masked crops, YOLO-seg, ZIP.

Input: a Label Studio JSON export (a list of tasks with `annotations`), from a file or read from
Label Studio's API. Each task's newest non-cancelled annotation is exported.

Frames and encodings (never mixed, always converted through an `(H, W) bool` mask):
- Label Studio brush RLE is row-major over RGBA (`label_studio_sdk.converter.brush`); the alpha
  channel is the mask. Label Studio geometry is in percent of `original_width/height`.
- COCO `segmentation` is compressed RLE, column-major (`pycocotools.mask`), `counts` as str;
  `bbox` is `[x, y, width, height]` in pixels, `area` in pixels, both computed from the mask.
- YOLO-seg lines are `class x1 y1 x2 y2 ...`, normalised to 0..1, class = category id - 1.

Everything is written into a temporary folder beside the destination and moved into place only
when the whole export succeeded, so a bad input leaves no partial output.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as mask_utils
from tqdm import tqdm

from sam_backend.masks import mask_to_coco, mask_to_polygons

log = logging.getLogger(__name__)

REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels")
CONTROL_TAGS = ("brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels", "labels")


class ExportError(ValueError):
    """The input cannot be exported; the message names the task, annotation or region."""


@dataclass(frozen=True)
class ExportOptions:
    """What to write; `tolerance_px` simplifies polygons (Douglas-Peucker, pixels)."""

    polygons: bool = False
    tolerance_px: float = 0.5
    masks: bool = True
    crops: bool = False
    yolo: bool = True
    jobs: int = 0  # 0: one per CPU
    progress: bool = True


@dataclass
class ExportSummary:
    tasks: int = 0
    images: int = 0
    annotations: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    crops: int = 0
    images_unreachable: int = 0
    tasks_without_regions: int = 0
    holes_lost: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["warnings"] = self.warnings[:50]
        return data


# -- input ------------------------------------------------------------------------------------

def load_tasks(path: Path) -> list[dict[str, Any]]:
    """Read a Label Studio JSON export; raises `ExportError` saying what is wrong with it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "bytes"
        raise ExportError(f"{path}: not valid JSON ({where}: {exc.msg if hasattr(exc, 'msg') else exc}); "
                          f"the file is truncated or corrupt ({len(raw)} bytes)") from None
    return validate_tasks(data, str(path))


def validate_tasks(data: Any, source: str) -> list[dict[str, Any]]:
    if isinstance(data, dict) and "data" in data:
        data = [data]
    if not isinstance(data, list):
        raise ExportError(f"{source}: expected a Label Studio JSON export (a list of tasks), got {type(data).__name__}")
    for i, task in enumerate(data):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise ExportError(f"{source}: task #{i}: expected an object with 'data', got {str(task)[:80]!r}")
        if not isinstance(task.get("annotations", []), list):
            raise ExportError(f"{source}: task {task.get('id', i)}: 'annotations' must be a list")
    return data


def categories_from_config(config: str) -> list[str]:
    """Label names of the labeling controls, in config order, each once."""
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(config)
    except Exception as exc:
        raise ExportError(f"label config: not a valid labeling config ({str(exc)[:200]})") from None
    names: list[str] = []
    for control in interface.controls:
        if control.tag.lower() in CONTROL_TAGS:
            for label in control.labels or ():
                if label not in names:
                    names.append(label)
    return names


def categories_from_tasks(tasks: Iterable[dict[str, Any]]) -> list[str]:
    """Fallback without a config: labels in order of first appearance."""
    names: list[str] = []
    for task in tasks:
        ann = pick_annotation(task)
        for region in (ann or {}).get("result", []):
            for label in _labels(region):
                if label not in names:
                    names.append(label)
    return names


def pick_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The newest annotation that was not cancelled (skipped), or None."""
    kept = [a for a in task.get("annotations", []) or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def _labels(region: dict[str, Any]) -> list[str]:
    value = region.get("value") or {}
    kind = region.get("type")
    labels = value.get(kind) if kind else None
    return [x for x in (labels or value.get("labels") or []) if isinstance(x, str)]


def image_url(task: dict[str, Any], key: str | None = None) -> str | None:
    data = task["data"]
    if key and isinstance(data.get(key), str):
        return data[key]
    for k in ("image", "img", "url"):
        if isinstance(data.get(k), str):
            return data[k]
    return next((v for v in data.values() if isinstance(v, str)), None)


def file_name_for(url: str | None, task_id: Any) -> str:
    if not url:
        return f"task-{task_id}.png"
    parts = urlsplit(url)
    path = parse_qs(parts.query).get("d", [parts.path])[0] if parts.path.endswith("local-files/") else parts.path
    name = PurePosixPath(unquote(path)).name
    return name or f"task-{task_id}.png"


# -- geometry ---------------------------------------------------------------------------------

def brush_to_mask(rle: list[int], width: int, height: int, where: str) -> np.ndarray:
    """Label Studio brush RLE → `(H, W) bool` (alpha channel > 0)."""
    try:
        flat = decode_rle(rle)
    except Exception as exc:
        raise ExportError(f"{where}: brush RLE cannot be decoded ({exc.__class__.__name__})") from None
    if flat.size != width * height * 4:
        raise ExportError(f"{where}: brush RLE holds {flat.size} values, expected {width}x{height}x4 = "
                          f"{width * height * 4}; the region does not fit its original_width/height")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def polygon_pixels(points: list[list[float]], width: int, height: int) -> np.ndarray:
    """Label Studio percent points → `(N, 2) float64` pixel (x, y)."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) / 100.0 * [width, height]


def polygon_to_mask(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    rles = mask_utils.frPyObjects([pixels.ravel().tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


# -- per task work (runs in worker processes) ------------------------------------------------

@dataclass
class _TaskOut:
    image: dict[str, Any] | None
    annotations: list[dict[str, Any]]
    by_type: dict[str, int]
    crops: int = 0
    unreachable: bool = False
    holes_lost: int = 0
    warnings: list[str] = field(default_factory=list)


_WORKER: dict[str, Any] = {}


def _init_worker(out_dir: str, categories: list[str], options: ExportOptions, fetch_settings: Any) -> None:
    _WORKER.update(out=Path(out_dir), categories={n: i + 1 for i, n in enumerate(categories)}, options=options,
                   fetch_settings=fetch_settings, fetcher=None)


def _fetcher() -> Any:
    if _WORKER.get("fetcher") is None:
        from sam_backend.images import ImageFetcher

        _WORKER["fetcher"] = ImageFetcher(_WORKER["fetch_settings"])
    return _WORKER["fetcher"]


def _atomic_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ExportError(f"cannot encode {path.name}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def _export_task(item: tuple[int, dict[str, Any], str]) -> _TaskOut:
    index, task, file_name = item
    out: Path = _WORKER["out"]
    cats: dict[str, int] = _WORKER["categories"]
    opts: ExportOptions = _WORKER["options"]
    task_id = task.get("id", index)
    ann = pick_annotation(task)
    regions = [r for r in (ann or {}).get("result", []) if isinstance(r, dict) and r.get("type") in REGION_TYPES]
    result = _TaskOut(None, [], {})
    if not regions:
        return result
    width = int(regions[0].get("original_width") or 0)
    height = int(regions[0].get("original_height") or 0)
    if width <= 0 or height <= 0:
        raise ExportError(f"task {task_id}: regions lack original_width/original_height")
    result.image = {"id": task_id, "file_name": file_name, "width": width, "height": height}
    stem = Path(file_name).stem
    instances = np.zeros((height, width), np.uint16)
    semantic = np.zeros((height, width), np.uint8)
    yolo_lines: list[str] = []
    crops_source: np.ndarray | None = None
    for k, region in enumerate(regions):
        where = f"task {task_id}, annotation {ann.get('id')}, region {region.get('id', k)}"
        kind = region["type"]
        labels = _labels(region)
        if not labels:
            result.warnings.append(f"{where}: no label, skipped")
            continue
        if labels[0] not in cats:
            result.warnings.append(f"{where}: label {labels[0]!r} is not in the label config, skipped")
            continue
        cat = cats[labels[0]]
        rw, rh = int(region.get("original_width") or width), int(region.get("original_height") or height)
        if (rw, rh) != (width, height):
            raise ExportError(f"{where}: image size {rw}x{rh} differs from the task's {width}x{height}")
        value = region.get("value") or {}
        entry: dict[str, Any] = {"image_id": task_id, "category_id": cat, "iscrowd": 0,
                                 "attributes": {"ls_region": region.get("id"), "ls_type": kind,
                                                "ls_annotation": ann.get("id"), "score": region.get("score")}}
        mask: np.ndarray | None = None
        try:
            if kind == "brushlabels":
                if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
                    raise ExportError(f"{where}: brush region without an RLE list")
                mask = brush_to_mask(value["rle"], width, height, where)
            elif kind == "polygonlabels":
                pixels = polygon_pixels(value["points"], width, height)
                if len(pixels) < 3:
                    raise ExportError(f"{where}: polygon with {len(pixels)} points")
                mask = polygon_to_mask(pixels, width, height)
            elif kind == "rectanglelabels":
                x, y = value["x"] / 100 * width, value["y"] / 100 * height
                w, h = value["width"] / 100 * width, value["height"] / 100 * height
                entry.update(bbox=[x, y, w, h], area=w * h, segmentation=[])
            else:
                x, y = value["x"] / 100 * width, value["y"] / 100 * height
                entry.update(bbox=[x, y, 0.0, 0.0], area=0.0, segmentation=[], keypoints=[x, y, 2], num_keypoints=1)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ExportError):
                raise
            raise ExportError(f"{where}: malformed {kind} value ({exc.__class__.__name__}: {exc})") from None
        if mask is not None:
            if not mask.any():
                result.warnings.append(f"{where}: empty mask, skipped")
                continue
            coco = mask_to_coco(mask)
            rle = coco["segmentation"]
            entry["area"] = float(coco["area"])
            entry["bbox"] = coco["bbox"]
            if opts.polygons:
                if kind == "polygonlabels":
                    entry["segmentation"] = [[float(v) for v in pixels.ravel()]]
                else:
                    polys, holes = mask_to_polygons(mask, opts.tolerance_px)
                    if holes:
                        result.holes_lost += 1
                        result.warnings.append(f"{where}: holes dropped by --polygons (use RLE to keep them)")
                    entry["segmentation"] = polys
            else:
                entry["segmentation"] = rle
            n = len(result.annotations) + 1
            instances[mask] = n
            semantic[mask] = cat
            if opts.masks:
                _atomic_png(out / "masks" / f"{task_id}_{stem}_{n}_{_safe(labels[0])}.png", mask.astype(np.uint8) * 255)
            if opts.yolo:
                polys = entry["segmentation"] if opts.polygons else mask_to_polygons(mask, opts.tolerance_px)[0]
                for poly in polys:
                    xy = np.asarray(poly).reshape(-1, 2) / [width, height]
                    yolo_lines.append(f"{cat - 1} " + " ".join(f"{v:.6f}" for v in np.clip(xy, 0, 1).ravel()))
            if opts.crops:
                if crops_source is None and not result.unreachable:
                    crops_source = _load_for_crops(task, result, where, width, height)
                if crops_source is not None:
                    _write_crop(out / "crops" / f"{task_id}_{stem}_{n}_{_safe(labels[0])}.png", crops_source, mask,
                                entry["bbox"])
                    result.crops += 1
        result.by_type[kind] = result.by_type.get(kind, 0) + 1
        result.annotations.append(entry)
    if opts.masks and result.annotations:
        _atomic_png(out / "masks" / f"{task_id}_{stem}_instances.png", instances)
        _atomic_png(out / "masks" / f"{task_id}_{stem}_semantic.png", semantic)
    if opts.yolo:
        (out / "yolo" / "labels" / f"{stem}.txt").write_text("\n".join(yolo_lines) + ("\n" if yolo_lines else ""))
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]


def _load_for_crops(task: dict[str, Any], result: _TaskOut, where: str, width: int, height: int) -> np.ndarray | None:
    from sam_backend.images import ImageError

    url = image_url(task)
    try:
        pixels = _fetcher().load(url).pixels
    except ImageError as exc:
        result.unreachable = True
        result.warnings.append(f"task {task.get('id')}: image unreachable, crops skipped ({exc.message})")
        return None
    if pixels.shape[:2] != (height, width):
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    return pixels


def _write_crop(path: Path, image: np.ndarray, mask: np.ndarray, bbox: list[float]) -> None:
    """The object on a transparent background, cut to its bounding box (RGBA PNG)."""
    x, y, w, h = (int(round(v)) for v in bbox)
    rgba = np.dstack([image[y:y + h, x:x + w], mask[y:y + h, x:x + w].astype(np.uint8) * 255])
    _atomic_png(path, cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))


# -- driver -----------------------------------------------------------------------------------

def export(tasks: list[dict[str, Any]], categories: list[str], dest: Path, options: ExportOptions | None = None,
           fetch_settings: Any = None, zip_path: Path | None = None, overwrite: bool = False) -> ExportSummary:
    """Export `tasks` into folder `dest` (or a ZIP at `zip_path`); returns what was written."""
    options = options or ExportOptions()
    target = zip_path or dest
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not empty; choose another path or pass --overwrite")
    if not categories:
        raise ExportError("no categories: the label config has no labels and the annotations name none")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        summary = _export_into(work, tasks, categories, options, fetch_settings)
        if zip_path is not None:
            tmp_zip = zip_path.with_name(zip_path.name + ".tmp")
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(work.rglob("*")):
                    if path.is_file():
                        zf.write(path, path.relative_to(work).as_posix())
            os.replace(tmp_zip, zip_path)
        else:
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
                os.replace(work, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(work, dest)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _names(tasks: list[dict[str, Any]]) -> list[str]:
    """Unique file names: the URL's basename, prefixed with the task id where two tasks share one."""
    base = [file_name_for(image_url(t), t.get("id", i)) for i, t in enumerate(tasks)]
    seen: dict[str, int] = {}
    for name in base:
        seen[name] = seen.get(name, 0) + 1
    return [n if seen[n] == 1 else f"{t.get('id', i)}_{n}" for i, (t, n) in enumerate(zip(tasks, base, strict=True))]


def _export_into(work: Path, tasks: list[dict[str, Any]], categories: list[str], options: ExportOptions,
                 fetch_settings: Any) -> ExportSummary:
    for sub, wanted in (("masks", options.masks), ("crops", options.crops), ("yolo/labels", options.yolo)):
        if wanted:
            (work / sub).mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(tasks=len(tasks))
    images, annotations = [], []
    items = [(i, t, n) for i, (t, n) in enumerate(zip(tasks, _names(tasks), strict=True))]
    for out in _run(items, work, categories, options, fetch_settings):
        summary.warnings.extend(out.warnings)
        summary.crops += out.crops
        summary.images_unreachable += int(out.unreachable)
        summary.holes_lost += out.holes_lost
        if out.image is None:
            summary.tasks_without_regions += 1
            continue
        images.append(out.image)
        for ann in out.annotations:
            ann["id"] = len(annotations) + 1
            annotations.append(ann)
        for kind, n in out.by_type.items():
            summary.by_type[kind] = summary.by_type.get(kind, 0) + n
    summary.images, summary.annotations = len(images), len(annotations)
    coco = {
        "info": {"description": "Label Studio annotations exported by sam-backend", "version": "1.0"},
        "licenses": [],
        "images": images,
        "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(categories)],
        "annotations": annotations,
    }
    (work / "coco.json").write_text(json.dumps(coco))
    if options.yolo:
        names = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(categories))
        (work / "yolo" / "data.yaml").write_text(
            "# YOLO-seg dataset written by sam-backend; put the images in yolo/images/ (same stems as labels/).\n"
            f"path: .\ntrain: images\nval: images\nnc: {len(categories)}\nnames:\n{names}\n")
    for warning in summary.warnings[:20]:
        log.warning("%s", warning)
    if len(summary.warnings) > 20:
        log.warning("... and %d more warnings", len(summary.warnings) - 20)
    return summary


def _run(items: list[tuple[int, dict[str, Any], str]], work: Path, categories: list[str], options: ExportOptions,
         fetch_settings: Any) -> Iterator[_TaskOut]:
    jobs = options.jobs or os.cpu_count() or 1
    bar = tqdm(total=len(items), unit="task", desc="export", disable=not options.progress)
    init = (str(work), categories, options, fetch_settings)
    try:
        if jobs <= 1 or len(items) < 8:
            _init_worker(*init)
            for item in items:
                yield _export_task(item)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
            with ctx.Pool(jobs, initializer=_init_worker, initargs=init) as pool:
                for out in pool.imap(_export_task, items, chunksize=8):
                    yield out
                    bar.update(1)
    finally:
        bar.close()


def fetch_project(base_url: str, api_key: str | None, project: int, timeout_s: float = 300.0
                  ) -> tuple[list[dict[str, Any]], str]:
    """Read a project's label config and its JSON export from Label Studio's API."""
    import requests

    from sam_backend.errors import ClientError
    from sam_backend.labelstudio import LabelStudioClient

    if not api_key:
        raise ExportError("--project needs LABEL_STUDIO_API_KEY (a personal access token)")
    client = LabelStudioClient(base_url, api_key)
    try:
        config = client.project(project).get("label_config") or ""
        data = client.call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON"},
                           timeout=timeout_s).json()
    except ClientError as exc:
        raise ExportError(exc.message) from None
    except (RuntimeError, requests.RequestException, ValueError) as exc:
        raise ExportError(f"reading project {project} from {client.url} failed: {exc}") from None
    return validate_tasks(data, f"project {project}"), config
