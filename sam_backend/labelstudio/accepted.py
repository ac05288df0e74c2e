"""Accepted masks, as Label Studio confirms them: a webhook is a notice, Label Studio is the truth.

An annotation webhook (`ANNOTATION_CREATED`, `ANNOTATION_UPDATED`, `ANNOTATIONS_DELETED`) is read only for which
annotations it names (`read_notice`). Each is then read back from Label Studio with the backend's own key
(`AnnotationSource.confirm`: `/api/annotations/<id>/` and its task, `/api/tasks/<id>/`): a 404 means deleted, a
cancelled (skipped) annotation gives nothing, and otherwise its `brushlabels` regions are what is learnt from, in the
project Label Studio says it belongs to. What a body claims beside the ids (its regions, its project) is never used.

A region becomes one `MaskRecord` (COCO RLE, column-major, at `original_height × original_width` pixels; Label Studio
brush RLE is row-major RGBA): each region is bounded before it is decoded (`SAM_MAX_IMAGE_PIXELS`, and the count its
RLE header declares) and encoded back to COCO RLE at once, so one annotation never holds more than one dense mask.
What cannot be learnt from is a `Skip` with a reason, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam_backend.labelstudio.brush import DEFAULT_MAX_PIXELS, BrushError, decode_brush
from sam_backend.labelstudio.labelconfig import task_image_url
from sam_backend.segment.masks import mask_to_rle

LEARN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
FORGET_ACTIONS = ("ANNOTATIONS_DELETED",)
MAX_NOTICE_IDS = 1000  # annotations one ANNOTATIONS_DELETED notice may name (each is asked of Label Studio)


@dataclass(frozen=True)
class Skip:
    """Something a webhook held that is not learnt from: `reason` (a short metric label) and what was wrong."""

    reason: str
    message: str


@dataclass(frozen=True)
class MaskRecord:
    """One accepted brush region: the project and annotation Label Studio holds it in, the region's id, its task and
    image URL, label, and the mask as COCO RLE (`counts` str, column-major) of `height × width` pixels."""

    project: str
    annotation_id: int
    region: str
    task_id: int | None
    image_url: str
    label: str | None
    height: int
    width: int
    counts: str

    @property
    def key(self) -> str:
        return f"{self.annotation_id}/{self.region}"

    def mask(self) -> np.ndarray:
        """`(H, W) bool`."""
        return mask_utils.decode({"size": [self.height, self.width], "counts": self.counts.encode("ascii")}
                                 ).astype(bool)


@dataclass
class Notice:
    """What a webhook names: its action, the annotation ids (positive integers), and what could not be read."""

    action: str
    annotations: list[int] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Confirmed:
    """One annotation as Label Studio holds it: `gone` (deleted: 404), or its project, whether it was cancelled,
    the masks of its brush regions and what was skipped."""

    annotation_id: int
    gone: bool = False
    project: str | None = None
    cancelled: bool = False
    masks: list[MaskRecord] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


class Unconfirmed(Exception):
    """Label Studio could not be asked (down, refused our key, answered nonsense): nothing is learnt or removed."""


MAX_ID = 2**31 - 1  # Label Studio's ids are PostgreSQL integers


def positive_id(value: Any) -> int | None:
    """`value` as a positive integer id up to `MAX_ID` (an int, or a string of digits), else None: ids become store
    keys and lock keys."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if isinstance(value, int) and 0 < value <= MAX_ID:
        return value
    return None


def project_of(body: Mapping[str, Any]) -> str | None:
    """The project id of a Label Studio request (`"<id>.<timestamp>"` or `<id>`) as a string of digits, or None
    where it is not a positive integer (it keys stores and names model versions)."""
    found = positive_id(str(body.get("project") or "").split(".")[0])
    return None if found is None else str(found)


def read_notice(body: Mapping[str, Any]) -> Notice:
    """The annotation ids an annotation webhook names (see the module docstring); any other action names none."""
    action = str(body.get("action") or "")
    out = Notice(action)
    if action in LEARN_ACTIONS:
        annotation = body.get("annotation")
        found = positive_id(annotation.get("id")) if isinstance(annotation, Mapping) else None
        if found is None:
            out.skipped.append(Skip("bad_annotation", f"{action}: expected an annotation object with a positive id, "
                                    f"got {type(annotation).__name__}"))
        else:
            out.annotations.append(found)
    elif action in FORGET_ACTIONS:
        listed = body.get("annotations")
        items = listed[:MAX_NOTICE_IDS] if isinstance(listed, list) else []
        ids = [positive_id(a.get("id")) if isinstance(a, Mapping) else None for a in items]
        out.annotations = [a for a in ids if a is not None]
        if len(out.annotations) != len(items) or not isinstance(listed, list) or len(listed) > MAX_NOTICE_IDS:
            out.skipped.append(Skip("bad_annotation", f"{action}: expected annotations [{{id}}] with positive ids "
                                    f"(at most {MAX_NOTICE_IDS}), got {type(listed).__name__}"))
    return out


def annotation_masks(annotation: Mapping[str, Any], task: Mapping[str, Any], project: str,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[MaskRecord | Skip]:
    """The `brushlabels` regions of one annotation (as Label Studio holds it), one at a time, each a `MaskRecord`
    or the `Skip` that says why not."""
    ann_id = positive_id(annotation.get("id")) or 0
    url = task_image_url(task)
    if url is None:
        yield Skip("no_image", f"annotation {ann_id}: expected task.data with the image URL, got "
                   f"{sorted(task.get('data') or {})}")
        return
    results = annotation.get("result")
    for i, region in enumerate(results if isinstance(results, list) else []):
        if not isinstance(region, Mapping) or region.get("type") != "brushlabels":
            continue
        region_id = str(region.get("id") or i)[:64]
        where = f"annotation {ann_id} region {region_id}"
        value = region.get("value") if isinstance(region.get("value"), Mapping) else {}
        width, height = region.get("original_width"), region.get("original_height")
        try:  # the region's size and its RLE's declared count are checked before anything is decoded
            mask = decode_brush(value.get("rle"), width, height, max_pixels)
        except BrushError as exc:
            yield Skip("bad_region", f"{where}: {exc}")
            continue
        if not mask.any():
            yield Skip("empty", f"{where}: the mask is empty")
            continue
        labels = value.get("brushlabels") or []
        rle = mask_to_rle(mask)
        del mask
        yield MaskRecord(project, ann_id, region_id, positive_id(task.get("id")), url,
                         labels[0] if labels and isinstance(labels[0], str) else None, height, width, rle["counts"])


class AnnotationSource:
    """Reads annotations back from Label Studio (`LABEL_STUDIO_URL`, with the backend's own key)."""

    def __init__(self, client: Any, max_pixels: int = DEFAULT_MAX_PIXELS, timeout_s: float = 10.0) -> None:
        self.client = client  # labelstudio.client.LabelStudioClient
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s

    def _get(self, path: str) -> dict[str, Any] | None:
        """The JSON object at `path`, None on 404; `Unconfirmed` on anything else."""
        try:
            r = self.client.call("GET", path, check=False, timeout=self.timeout_s)
        except Exception as exc:  # requests' errors, the auth's LabelStudioError: Label Studio cannot be asked
            raise Unconfirmed(f"Label Studio cannot be asked for {path} ({type(exc).__name__})") from None
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise Unconfirmed(f"Label Studio answered {path} with HTTP {r.status_code}")
        try:
            data = r.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise Unconfirmed(f"Label Studio answered {path} with something that is not a JSON object")
        return data

    def confirm(self, annotation_id: int) -> Confirmed:
        """The annotation as Label Studio holds it now (see `Confirmed`); `Unconfirmed` where it cannot be asked."""
        out = Confirmed(annotation_id)
        annotation = self._get(f"/api/annotations/{int(annotation_id)}/")
        if annotation is None:
            out.gone = True
            return out
        task_id = positive_id(annotation.get("task"))
        if task_id is None:
            raise Unconfirmed(f"annotation {annotation_id}: Label Studio's answer names no task")
        task = self._get(f"/api/tasks/{task_id}/")
        if task is None:
            out.gone = True  # its task was deleted with it
            return out
        project = positive_id(task.get("project"))
        if project is None:
            raise Unconfirmed(f"task {task_id}: Label Studio's answer names no project")
        out.project = str(project)
        if annotation.get("was_cancelled"):
            out.cancelled = True
            out.skipped.append(Skip("cancelled", f"annotation {annotation_id} was cancelled (task skipped)"))
            return out
        for found in annotation_masks(annotation, task, out.project, self.max_pixels):
            (out.masks if isinstance(found, MaskRecord) else out.skipped).append(found)
        return out
