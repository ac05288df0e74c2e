"""Objects to evaluate on: the standard interactive-segmentation folder layouts, Label Studio exports, COCO files.

Folder layouts (as the RITM evaluation code reads them; a mask has its image's file stem):

| layout | images | masks | mask rule |
|---|---|---|---|
| GrabCut | `data_GT/` | `boundary_GT/<stem>.bmp` | 255 object, 0 background, 128 unlabeled band: ignored |
| Berkeley | `images/` | `masks/<stem>.png` | channel 0 > 128 object (128 ignored, as GrabCut) |
| DAVIS, COCO-MVal | `img/` | `gt/<stem>.png` | > 0 object |

Each object is an `EvalObject`: its image (a path the backend's image loader reads from `LOCAL_FILES_DOCUMENT_ROOT`,
or a URL), its true `(H, W) bool` mask, and the `(H, W) bool` pixels to ignore (or None).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from sam_backend.labelstudio.labelconfig import task_image_url
from sam_backend.sidecar.export.reader import categories_from_tasks, decode_task, file_names, validate_tasks

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GRABCUT_IGNORE = 128
COCO_MVAL_NAME = re.compile(r"^(.+?)\d+_\d+$")


class EvaluateError(ValueError):
    """The data cannot be evaluated; the message says what is wrong with it."""


@dataclass
class EvalObject:
    """One labeled object: where its image is, its true `(H, W) bool` mask, and `(H, W) bool` pixels that count in
    neither the IoU nor the simulator's error regions (None: every pixel counts)."""

    name: str
    image: str  # URL or path the backend's image loader understands
    mask: np.ndarray
    category: str
    ignore: np.ndarray | None = None


@dataclass(frozen=True)
class Layout:
    """A folder layout: the image and mask subfolders, the mask file suffix, and how a mask file's pixels read."""

    name: str
    images: str
    masks: str
    rule: str  # "grabcut": 255 object / 128 ignored (channel 0); "positive": > 0 object


LAYOUTS = (
    Layout("GrabCut", "data_GT", "boundary_GT", "grabcut"),
    Layout("Berkeley", "images", "masks", "grabcut"),
    Layout("img/gt (DAVIS, COCO-MVal)", "img", "gt", "positive"),
)


def image_root(path: Path, images: Path | None = None) -> Path | None:
    """The folder the image paths of `load_objects(path, images)` are relative to (None where they are URLs)."""
    return path / detect_layout(path).images if path.is_dir() else images


def by_category(objects: Iterable[EvalObject]) -> dict[str, list[EvalObject]]:
    """`objects` per category, categories in order of first appearance, objects in their order."""
    groups: dict[str, list[EvalObject]] = {}
    for obj in objects:
        groups.setdefault(obj.category, []).append(obj)
    return groups


def load_objects(path: Path, images: Path | None = None, limit: int | None = None) -> list[EvalObject]:
    """Objects from a dataset folder (one of `LAYOUTS`), a Label Studio export or a COCO file (images: `images`,
    matched by file name, else the URLs the data holds)."""
    if path.is_dir():
        objects = list(folder_objects(path, detect_layout(path), limit))
    else:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise EvaluateError(f"{path}: cannot read it as JSON ({exc})") from None
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            objects = list(_coco_objects(data, images))
        else:
            objects = list(_label_studio_objects(validate_tasks(data, str(path)), images))
    if not objects:
        raise EvaluateError(f"{path}: no object with a mask (brush, polygon, COCO segmentation or mask file) to "
                            "evaluate")
    return objects[:limit] if limit else objects


def detect_layout(folder: Path) -> Layout:
    """The layout whose image and mask subfolders `folder` has; `EvaluateError` naming the expected ones."""
    for layout in LAYOUTS:
        if (folder / layout.images).is_dir() and (folder / layout.masks).is_dir():
            return layout
    expected = "; ".join(f"{lay.name}: {lay.images}/ + {lay.masks}/" for lay in LAYOUTS)
    found = sorted(p.name + "/" for p in folder.iterdir() if p.is_dir())[:8]
    raise EvaluateError(f"{folder}: not a dataset folder: expected one of {expected}; found {found or 'no folders'}")


def read_mask(path: Path, rule: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`(object (H, W) bool, ignored (H, W) bool or None)` from one mask file, by `rule` (see `Layout`)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise EvaluateError(f"{path}: cannot read it as an image")
    channel = raw[..., 0] if raw.ndim == 3 else raw
    if rule == "grabcut":
        ignore = channel == GRABCUT_IGNORE
        return channel > GRABCUT_IGNORE, (ignore if ignore.any() else None)
    return channel > 0, None


def folder_objects(folder: Path, layout: Layout, limit: int | None = None) -> Iterator[EvalObject]:
    """One object per mask file of `folder` (sorted by name), its image found by file stem."""
    images = {p.stem: p for p in sorted((folder / layout.images).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    count = 0
    for mask_path in sorted((folder / layout.masks).iterdir()):
        if mask_path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        image = images.get(mask_path.stem)
        if image is None:
            raise EvaluateError(f"{mask_path}: no image {mask_path.stem}.* in {folder / layout.images}")
        mask, ignore = read_mask(mask_path, layout.rule)
        if not mask.any():
            continue
        named = COCO_MVAL_NAME.match(mask_path.stem)  # COCO-MVal: `<category><NN>_<coco id>`
        yield EvalObject(mask_path.stem, image.name, mask, named.group(1) if named else folder.name, ignore)
        count += 1
        if limit and count >= limit:
            return


def _label_studio_objects(tasks: list[dict[str, Any]], images: Path | None) -> Iterator[EvalObject]:
    categories = {name: i + 1 for i, name in enumerate(categories_from_tasks(tasks))}
    for i, (task, file_name) in enumerate(zip(tasks, file_names(tasks), strict=True)):
        decoded = decode_task(i, task, file_name, categories)
        if decoded is None:
            continue
        url = file_name if images is not None else task_image_url(task)
        for obj in decoded.objects:
            if obj.mask is not None:
                yield EvalObject(f"task {decoded.task_id} region {obj.attributes['ls_region']}", url, obj.mask,
                                 obj.label)


def _coco_objects(coco: dict[str, Any], images: Path | None) -> Iterator[EvalObject]:
    by_id = {img["id"]: img for img in coco["images"]}
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    for ann in coco["annotations"]:
        img = by_id.get(ann.get("image_id"))
        seg = ann.get("segmentation")
        if img is None or not seg:
            continue
        h, w = int(img["height"]), int(img["width"])
        if isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        elif isinstance(seg, dict):
            counts = seg["counts"]
            rle = {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        mask = mask_utils.decode(rle).astype(bool)
        if mask.any():
            yield EvalObject(f"image {img['id']} annotation {ann.get('id')}", img["file_name"], mask,
                             names.get(ann.get("category_id"), str(ann.get("category_id"))))
