"""Accepted masks out of Label Studio's annotation webhooks (`ANNOTATION_CREATED`, `ANNOTATION_UPDATED`,
`ANNOTATIONS_DELETED`): what the team kept, for the backend to learn from (`serving.adapters`).

A webhook body carries `action`, `project` (an object with `id`, or an id), `task` (with `data`, the image URL) and
`annotation` (its `result`: Label Studio regions; `was_cancelled` for a skipped task). Each `brushlabels` region
becomes one `AcceptedMask`: its `(H, W) bool` mask at `original_height × original_width` pixels (Label Studio brush
RLE, row-major RGBA). What cannot be learnt from is skipped with a reason (`Skip`), never raised: a body without a
project, a cancelled annotation, an empty or undecodable region, a task without an image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam_backend.labelstudio.brush import BrushError, decode_brush
from sam_backend.labelstudio.labelconfig import task_image_url

LEARN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
FORGET_ACTIONS = ("ANNOTATIONS_DELETED",)


@dataclass(frozen=True)
class Skip:
    """Something a webhook held that is not learnt from: `reason` (a short metric label) and what was wrong."""

    reason: str
    message: str


@dataclass
class AcceptedMask:
    """One accepted brush region: `key` `<annotation id>/<region id>` (stable across updates), its task's image
    URL, label, and the `(H, W) bool` mask in the image's pixels."""

    key: str
    task_id: Any
    annotation_id: Any
    image_url: str
    label: str | None
    mask: np.ndarray


@dataclass
class WebhookMasks:
    """What one webhook says: the project (None: unknown), the annotations whose earlier masks it replaces or
    removes, the masks to learn from, and what was skipped."""

    action: str
    project: str | None
    annotations: list[Any] = field(default_factory=list)
    masks: list[AcceptedMask] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def project_id(body: Mapping[str, Any]) -> str | None:
    """The project's id as a string (`project` an object with `id`, or an id; else the annotation's or task's)."""
    candidates = [body.get("project")]
    for key in ("annotation", "task"):
        if isinstance(body.get(key), Mapping):
            candidates.append(body[key].get("project"))
    for value in candidates:
        if isinstance(value, Mapping):
            value = value.get("id")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return str(value)
        if isinstance(value, str) and value.isdigit() and int(value) > 0:
            return str(int(value))
    return None


def read_webhook(body: Mapping[str, Any]) -> WebhookMasks:
    """The accepted masks of one annotation webhook (see the module docstring); any other action gives none."""
    action = str(body.get("action") or "")
    out = WebhookMasks(action, project_id(body))
    if action not in LEARN_ACTIONS + FORGET_ACTIONS:
        return out
    if out.project is None:
        out.skipped.append(Skip("unknown_project", f"{action}: expected a project id (project.id), got "
                                f"{type(body.get('project')).__name__}"))
        return out
    if action in FORGET_ACTIONS:
        out.annotations = [a.get("id") for a in body.get("annotations") or [] if isinstance(a, Mapping)]
        return out
    annotation, task = body.get("annotation"), body.get("task")
    if not isinstance(annotation, Mapping):
        out.skipped.append(Skip("bad_annotation", f"{action}: expected an annotation object, got "
                                f"{type(annotation).__name__}"))
        return out
    ann_id = annotation.get("id")
    out.annotations = [ann_id]  # an update replaces what the annotation gave before
    if annotation.get("was_cancelled"):
        out.skipped.append(Skip("cancelled", f"annotation {ann_id} was cancelled (task skipped)"))
        return out
    url = task_image_url(task) if isinstance(task, Mapping) else None
    if url is None:
        out.skipped.append(Skip("no_image", f"annotation {ann_id}: expected task.data with the image URL, got "
                                f"{'no task' if not isinstance(task, Mapping) else sorted(task.get('data') or {})}"))
        return out
    results = annotation.get("result")
    for i, region in enumerate(results if isinstance(results, list) else []):
        if not isinstance(region, Mapping) or region.get("type") != "brushlabels":
            continue
        where = f"annotation {ann_id} region {region.get('id') or i}"
        value = region.get("value") if isinstance(region.get("value"), Mapping) else {}
        width, height = region.get("original_width"), region.get("original_height")
        if not (isinstance(width, int) and isinstance(height, int) and 0 < width <= 20000 and 0 < height <= 20000):
            out.skipped.append(Skip("bad_region", f"{where}: expected original_width/height in pixels, got "
                                    f"{width!r}×{height!r}"))
            continue
        try:
            mask = decode_brush(value.get("rle"), width, height)
        except BrushError as exc:
            out.skipped.append(Skip("bad_region", f"{where}: {exc}"))
            continue
        if not mask.any():
            out.skipped.append(Skip("empty", f"{where}: the mask is empty"))
            continue
        labels = value.get("brushlabels") or []
        out.masks.append(AcceptedMask(f"{ann_id}/{region.get('id') or i}", (task or {}).get("id"), ann_id, url,
                                      labels[0] if labels and isinstance(labels[0], str) else None, mask))
    return out
