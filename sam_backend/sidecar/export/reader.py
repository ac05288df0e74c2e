"""Label Studio JSON export → one `DecodedTask` per task: the record every format writer is fed.

Input: a list of tasks with `annotations`, from a file or from Label Studio's API. Each task's newest
non-cancelled annotation is read. Brush regions are decoded to `(H, W) bool` masks (Label Studio
brush RLE, row-major RGBA), polygons are rasterised (pycocotools), rectangles and keypoints keep their
pixel geometry; Label Studio's percent frame is converted with `sam_backend.labelstudio.geometry`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from pycocotools import mask as mask_utils

from sam_backend.errors import ClientError
from sam_backend.labelstudio.brush import BrushError, decode_brush
from sam_backend.labelstudio.geometry import percent_to_pixels, rectangle_to_pixels
from sam_backend.labelstudio.labelconfig import category_names, task_image_url
from sam_backend.segment.masks import mask_to_coco, mask_to_polygons

REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels")


class ExportError(ValueError):
    """The input cannot be exported; the message names the task, annotation or region."""


@dataclass
class ExportObject:
    """One labelled region of a task, in pixels. `index` is 1-based among the task's exported objects
    (the instance id in PNGs and the number in file names)."""

    index: int
    where: str  # "task T, annotation A, region R", for messages
    kind: str  # the region type, e.g. "brushlabels"
    label: str
    category: int  # 1-based category id
    attributes: dict[str, Any]
    bbox: list[float]  # XYWH pixels
    area: float  # pixels
    mask: np.ndarray | None = None  # (H, W) bool for brush and polygon regions
    rle: dict[str, Any] | None = None  # COCO RLE of `mask`
    ring: np.ndarray | None = None  # (N, 2) float64 pixels of a polygon region
    keypoint: tuple[float, float] | None = None
    _contours: dict[float, tuple[list[list[float]], bool]] = field(default_factory=dict, repr=False)

    def contours(self, tolerance_px: float) -> tuple[list[list[float]], bool]:
        """COCO polygons of `mask` (pixel edges, simplified) and whether holes were lost; computed once."""
        if tolerance_px not in self._contours:
            self._contours[tolerance_px] = mask_to_polygons(self.mask, tolerance_px)
        return self._contours[tolerance_px]


@dataclass
class DecodedTask:
    """A task's exported objects and what is needed to write them."""

    task: dict[str, Any]
    task_id: Any
    annotation_id: Any
    file_name: str
    width: int
    height: int
    objects: list[ExportObject]
    warnings: list[str]

    @property
    def stem(self) -> str:
        return Path(self.file_name).stem


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
    try:
        return category_names(config)
    except ClientError as exc:
        raise ExportError(exc.message.replace("label_config:", "label config:", 1)) from None


def categories_from_tasks(tasks: list[dict[str, Any]]) -> list[str]:
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


def file_names(tasks: list[dict[str, Any]]) -> list[str]:
    """Unique file names: the URL's basename, prefixed with the task id where two tasks share one."""
    base = [_file_name(task_image_url(t), t.get("id", i)) for i, t in enumerate(tasks)]
    seen: dict[str, int] = {}
    for name in base:
        seen[name] = seen.get(name, 0) + 1
    return [n if seen[n] == 1 else f"{t.get('id', i)}_{n}" for i, (t, n) in enumerate(zip(tasks, base, strict=True))]


def _file_name(url: str | None, task_id: Any) -> str:
    if not url:
        return f"task-{task_id}.png"
    parts = urlsplit(url)
    path = parse_qs(parts.query).get("d", [parts.path])[0] if parts.path.endswith("local-files/") else parts.path
    name = PurePosixPath(unquote(path)).name
    return name or f"task-{task_id}.png"


def polygon_to_mask(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`(N, 2)` pixel polygon → `(H, W) bool`, rasterised as COCO does."""
    rles = mask_utils.frPyObjects([pixels.ravel().tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def decode_task(index: int, task: dict[str, Any], file_name: str, categories: dict[str, int]) -> DecodedTask | None:
    """The task's newest annotation as `ExportObject`s; None where it has no region to export."""
    task_id = task.get("id", index)
    ann = pick_annotation(task)
    regions = [r for r in (ann or {}).get("result", []) if isinstance(r, dict) and r.get("type") in REGION_TYPES]
    if not regions:
        return None
    width = int(regions[0].get("original_width") or 0)
    height = int(regions[0].get("original_height") or 0)
    if width <= 0 or height <= 0:
        raise ExportError(f"task {task_id}: regions lack original_width/original_height")
    decoded = DecodedTask(task, task_id, ann.get("id"), file_name, width, height, [], [])
    for k, region in enumerate(regions):
        where = f"task {task_id}, annotation {ann.get('id')}, region {region.get('id', k)}"
        obj = _decode_region(region, where, decoded, categories)
        if obj is not None:
            decoded.objects.append(obj)
    return decoded


def _decode_region(region: dict[str, Any], where: str, task: DecodedTask,
                   categories: dict[str, int]) -> ExportObject | None:
    kind = region["type"]
    labels = _labels(region)
    if not labels:
        task.warnings.append(f"{where}: no label, skipped")
        return None
    if labels[0] not in categories:
        task.warnings.append(f"{where}: label {labels[0]!r} is not in the label config, skipped")
        return None
    width, height = task.width, task.height
    rw, rh = int(region.get("original_width") or width), int(region.get("original_height") or height)
    if (rw, rh) != (width, height):
        raise ExportError(f"{where}: image size {rw}x{rh} differs from the task's {width}x{height}")
    value = region.get("value") or {}
    obj = ExportObject(len(task.objects) + 1, where, kind, labels[0], categories[labels[0]],
                       {"ls_region": region.get("id"), "ls_type": kind, "ls_annotation": task.annotation_id,
                        "score": region.get("score")}, [], 0.0)
    try:
        if kind == "brushlabels":
            if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
                raise ExportError(f"{where}: brush region without an RLE list")
            try:
                obj.mask = decode_brush(value["rle"], width, height)
            except BrushError as exc:
                raise ExportError(f"{where}: {exc}") from None
        elif kind == "polygonlabels":
            obj.ring = percent_to_pixels(value["points"], (width, height))
            if len(obj.ring) < 3:
                raise ExportError(f"{where}: polygon with {len(obj.ring)} points")
            obj.mask = polygon_to_mask(obj.ring, width, height)
        elif kind == "rectanglelabels":
            x, y, w, h = rectangle_to_pixels(value, (width, height))
            obj.bbox, obj.area = [x, y, w, h], w * h
        else:
            (x, y), = percent_to_pixels((value["x"], value["y"]), (width, height)).tolist()
            obj.bbox, obj.area, obj.keypoint = [x, y, 0.0, 0.0], 0.0, (x, y)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{where}: malformed {kind} value ({exc.__class__.__name__}: {exc})") from None
    if obj.mask is not None:
        if not obj.mask.any():
            task.warnings.append(f"{where}: empty mask, skipped")
            return None
        coco = mask_to_coco(obj.mask)
        obj.rle, obj.area, obj.bbox = coco["segmentation"], float(coco["area"]), coco["bbox"]
    return obj
