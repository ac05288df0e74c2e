"""The team's objects: each accepted mask region of a project joined to the interactions in the log that made it.

Inputs are the sidecar's interaction rows of one project (`history` rows: `created_at` ISO 8601 UTC, `task_id`,
`label`, `prompt` in pixels, `coco_annotation` with the answered mask as COCO RLE, `latency_ms`, `model_version`)
and the project's tasks as Label Studio exports them (annotations with `result` regions, `created_at`,
`updated_at`, `was_cancelled`). Nothing here talks to a server.

The rule, in the order it is applied:

| case | what it becomes |
|---|---|
| annotation cancelled (task skipped) or deleted (absent from the export) | left out |
| `brushlabels` / `polygonlabels` region with `origin: "manual"` (drawn by hand in the editor) | hand-drawn |
| region whose best logged answer (same task and label, before the annotation was saved) has IoU < 0.5 | hand-drawn |
| otherwise | an object: the best answer (highest IoU, the latest of equals) and the requests of its run before it |

A run is the requests of one task and label in time order, up to the next that starts a new object: a box with no
clicks, or one click with no box (Label Studio sends every keypoint of the label so far with each click, and clears
them when a suggestion is accepted), or one more than `RUN_GAP_S` (the object memory's lifetime) after the last.
Requests answered but never part of an accepted object's run are the suggestions nobody kept.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam_backend.labelstudio.accepted import positive_id
from sam_backend.labelstudio.brush import DEFAULT_MAX_PIXELS, BrushError, decode_brush
from sam_backend.segment.masks import mask_to_rle

MIN_IOU = 0.5  # below this a region was not made from the backend's answer
AS_ANSWERED_IOU = 0.99  # at or above this a region was accepted as answered (no painting after)
RUN_GAP_S = 600.0  # SAM_OBJECT_MEMORY_TTL_S's default: a longer pause starts a new object
_SLACK = timedelta(seconds=5)  # Label Studio's and the backend's clocks (the same host, or NTP-close)
MASK_TYPES = ("brushlabels", "polygonlabels")


def parse_time(text: Any) -> datetime | None:
    """An ISO 8601 time (`Z` or an offset; naive is UTC) as an aware UTC datetime, None where unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


@dataclass(frozen=True)
class Step:
    """One logged request of an object: `kind` is `box`, `click`, `negative click` or `stroke` (what it added to the
    object's prompt), `at` UTC, the backend's answer time in ms and the model version that answered."""

    row_id: int
    kind: str
    at: datetime
    latency_ms: float | None
    model_version: str | None

    @property
    def version(self) -> int:
        """The adapted decoder version that answered (0: the base model)."""
        return version_of(self.model_version)

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row_id, "kind": self.kind, "at": self.at.isoformat(), "latency_ms": self.latency_ms,
                "model_version": self.model_version}


@dataclass
class TeamObject:
    """One accepted region. `steps` is empty for a hand-drawn one; `iou` is the region's mask IoU with the last
    answer (1.0: accepted as answered), `accepted_at` when its annotation was saved."""

    task_id: int
    annotation_id: int
    region: str
    label: str | None
    origin: str | None
    accepted_at: datetime
    steps: list[Step] = field(default_factory=list)
    iou: float | None = None

    @property
    def by_backend(self) -> bool:
        return bool(self.steps)

    @property
    def clicks(self) -> int:
        """Prompts the annotator gave for it (each box and each click is one)."""
        return len(self.steps)

    @property
    def as_answered(self) -> bool:
        return self.iou is not None and self.iou >= AS_ANSWERED_IOU

    @property
    def seconds(self) -> float | None:
        """From the first prompt to the saved annotation."""
        return (self.accepted_at - self.steps[0].at).total_seconds() if self.steps else None

    @property
    def version(self) -> int:
        """The adapted decoder version that gave the last answer (0: the base model)."""
        return self.steps[-1].version if self.steps else 0

    @property
    def day(self) -> str:
        return (self.steps[0].at if self.steps else self.accepted_at).date().isoformat()

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task_id, "annotation": self.annotation_id, "region": self.region, "label": self.label,
                "origin": self.origin, "by_backend": self.by_backend, "clicks": self.clicks,
                "iou_with_last_answer": None if self.iou is None else round(self.iou, 4),
                "accepted_as_answered": self.as_answered, "seconds_to_accept": self.seconds,
                "accepted_at": self.accepted_at.isoformat(), "version": self.version,
                "steps": [s.to_json() for s in self.steps]}


@dataclass
class Matched:
    """Every accepted region (`objects`, hand-drawn ones with no steps), the runs nobody kept, and every answer with
    its label."""

    objects: list[TeamObject] = field(default_factory=list)
    unkept: list[list[Step]] = field(default_factory=list)
    answers: list[tuple[str | None, Step]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def version_of(model_version: str | None) -> int:
    """`…-adapted-p<project>-v<N>` → N; anything else (the base model) → 0."""
    if not model_version or "-adapted-p" not in model_version:
        return 0
    tail = model_version.rsplit("-v", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _kind(prompt: Mapping[str, Any], before: Mapping[str, Any] | None) -> str:
    """What this request added to the object: the newest click's sign, a box, or a brush stroke."""
    points = prompt.get("points") or []
    earlier = len((before or {}).get("points") or [])
    if len(points) > earlier:
        return "click" if int(points[-1][2]) == 1 else "negative click"
    if prompt.get("box") is not None and (before is None or before.get("box") != prompt.get("box")):
        return "box"
    if prompt.get("stroke_px"):
        return "stroke"
    return "click" if points else "box"


def _starts_object(prompt: Mapping[str, Any]) -> bool:
    points = prompt.get("points") or []
    return (prompt.get("box") is not None and not points) or (prompt.get("box") is None and len(points) == 1)


@dataclass
class _Row:
    row: dict[str, Any]
    at: datetime
    rle: dict[str, Any] | None
    run: int = -1
    taken: bool = False


def _runs(rows: list[_Row]) -> list[list[_Row]]:
    """One task and label's rows (time order) cut into runs (see the module docstring)."""
    runs: list[list[_Row]] = []
    for item in rows:
        prompt = item.row.get("prompt") or {}
        if not runs or _starts_object(prompt) or (item.at - runs[-1][-1].at).total_seconds() > RUN_GAP_S:
            runs.append([])
        item.run = len(runs) - 1
        runs[-1].append(item)
    return runs


def _step(item: _Row, before: Mapping[str, Any] | None) -> Step:
    """One row as a step of its object (`before`: the object's previous prompt, None for its first)."""
    return Step(int(item.row["id"]), _kind(item.row.get("prompt") or {}, before), item.at, item.row.get("latency_ms"),
                item.row.get("model_version"))


def _steps(run: list[_Row]) -> list[Step]:
    return [_step(item, run[k - 1].row.get("prompt") or {} if k else None) for k, item in enumerate(run)]


def region_rle(region: Mapping[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """A brush or polygon region's mask as COCO RLE; `BrushError` where it cannot be read (size checked first)."""
    width, height = region.get("original_width"), region.get("original_height")
    value = region.get("value") if isinstance(region.get("value"), Mapping) else {}
    if region.get("type") == "brushlabels":
        return mask_to_rle(decode_brush(value.get("rle"), width, height, max_pixels))
    if not (isinstance(width, int) and isinstance(height, int)) or not 0 < width * height <= max_pixels:
        raise BrushError(f"polygon region: expected a size up to {max_pixels} pixels, got {width!r}×{height!r}")
    points = np.asarray(value.get("points") or [], dtype=np.float64).reshape(-1, 2) / 100.0 * [width, height]
    if len(points) < 3:
        raise BrushError(f"polygon region: expected at least 3 points, got {len(points)}")
    return mask_utils.merge(mask_utils.frPyObjects([points.ravel().tolist()], height, width))


def _label(region: Mapping[str, Any]) -> str | None:
    value = region.get("value") if isinstance(region.get("value"), Mapping) else {}
    labels = value.get(region.get("type")) or []
    return labels[0] if labels and isinstance(labels[0], str) else None


def _row_rle(row: Mapping[str, Any]) -> dict[str, Any] | None:
    seg = (row.get("coco_annotation") or {}).get("segmentation")
    if not isinstance(seg, Mapping) or "counts" not in seg:
        return None
    return {"size": list(seg["size"]), "counts": str(seg["counts"]).encode("ascii")}


def _iou(a: dict[str, Any], b: dict[str, Any]) -> float:
    if list(a["size"]) != list(b["size"]):
        return 0.0
    return float(mask_utils.iou([a], [b], [0])[0][0])


def _rows_by_object(rows: Iterable[Mapping[str, Any]], out: Matched) -> dict[tuple[int, str | None], list[_Row]]:
    """Rows with a task, by (task, label), in time order; every answer also goes to `out.answers`."""
    grouped: dict[tuple[int, str | None], list[_Row]] = defaultdict(list)
    for row in rows:
        at = parse_time(row.get("created_at"))
        if at is None:
            out.skipped.append(f"interaction {row.get('id')}: unreadable created_at {row.get('created_at')!r}")
            continue
        item = _Row(dict(row), at, _row_rle(row))
        out.answers.append((row.get("label"), _step(item, None)))
        task = positive_id(row.get("task_id"))
        if task is not None:
            grouped[(task, row.get("label"))].append(item)
    for items in grouped.values():
        items.sort(key=lambda i: (i.at, i.row["id"]))
        _runs(items)
    return grouped


def _annotations(task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A task's annotations that count (not cancelled), oldest first."""
    kept = [a for a in task.get("annotations") or [] if isinstance(a, Mapping) and not a.get("was_cancelled")]
    return sorted(kept, key=lambda a: (str(a.get("created_at") or ""), a.get("id") or 0))


def _best(candidates: list[_Row], rle: dict[str, Any], saved: datetime) -> tuple[_Row | None, float]:
    best, best_iou = None, 0.0
    for item in candidates:
        if item.taken or item.rle is None or item.at > saved:
            continue
        score = _iou(item.rle, rle)
        if score >= best_iou and score > 0:
            best, best_iou = item, score
    return best, best_iou


def _take(group: list[_Row], best: _Row) -> list[_Row]:
    """The rows of `best`'s run up to it, after the last one another object took, marked taken."""
    upto = group[:group.index(best) + 1]
    run = [i for i in upto if i.run == best.run]
    start = max((k + 1 for k, i in enumerate(run) if i.taken), default=0)
    chosen = run[start:]
    for item in chosen:
        item.taken = True
    return chosen


def _region_object(task_id: int, annotation: Mapping[str, Any], region: Mapping[str, Any], index: int,
                   group: list[_Row], out: Matched, max_pixels: int) -> TeamObject | None:
    """One region as an object (see the rule in the module docstring); None where it cannot be read."""
    ann_id = positive_id(annotation.get("id")) or 0
    region_id = str(region.get("id") or index)[:64]
    created = parse_time(annotation.get("created_at"))
    saved = parse_time(annotation.get("updated_at")) or created
    if created is None or saved is None:
        out.skipped.append(f"task {task_id} annotation {ann_id}: no readable created_at")
        return None
    try:
        rle = region_rle(region, max_pixels)
    except BrushError as exc:
        out.skipped.append(f"task {task_id} annotation {ann_id} region {region_id}: {exc}")
        return None
    origin = region.get("origin") if isinstance(region.get("origin"), str) else None
    obj = TeamObject(task_id, ann_id, region_id, _label(region), origin, created)
    if origin == "manual":
        return obj
    best, score = _best(group, rle, saved + _SLACK)
    if best is None or score < MIN_IOU:
        return obj
    obj.steps, obj.iou = _steps(_take(group, best)), score
    if obj.steps[-1].at > created:
        obj.accepted_at = saved  # the region came with a later update of the annotation
    return obj


def steps_for(rows: Iterable[Mapping[str, Any]], task_id: int, label: str | None, rle: dict[str, Any],
              saved: datetime) -> list[Step]:
    """The logged requests that made one accepted mask (`rle`: COCO RLE, `counts` bytes) of `task_id` saved at
    `saved`, by the same rule as `match`; [] where none did (drawn by hand). `rows` are the task's log rows."""
    group = _rows_by_object(rows, Matched()).get((task_id, label), [])
    best, score = _best(group, rle, saved + _SLACK)
    return [] if best is None or score < MIN_IOU else _steps(_take(group, best))


def match(rows: Iterable[Mapping[str, Any]], tasks: Iterable[Mapping[str, Any]],
          max_pixels: int = DEFAULT_MAX_PIXELS, progress: Any = None) -> Matched:
    """Join a project's logged interactions to its accepted regions (the rule in the module docstring).
    `progress`, if given, is called once per task."""
    out = Matched()
    grouped = _rows_by_object(rows, out)
    for task in tasks:
        task_id = positive_id(task.get("id"))
        if task_id is not None:
            for annotation in _annotations(task):
                results = annotation.get("result") if isinstance(annotation.get("result"), list) else []
                for k, region in enumerate(results):
                    if isinstance(region, Mapping) and region.get("type") in MASK_TYPES:
                        found = _region_object(task_id, annotation, region, k,
                                               grouped.get((task_id, _label(region)), []), out, max_pixels)
                        if found is not None:
                            out.objects.append(found)
        if progress is not None:
            progress()
    for group in grouped.values():
        for run in sorted({i.run for i in group}):
            left = [i for i in group if i.run == run and not i.taken]
            if left:
                out.unkept.append(_steps(left))
    out.objects.sort(key=lambda o: (o.steps[0].at if o.steps else o.accepted_at, o.task_id, o.region))
    return out


def since(matched: Matched, when: datetime | None) -> Matched:
    """Only what began at or after `when`: objects by their first prompt (hand-drawn ones by their annotation),
    answers and unkept runs by their time."""
    if when is None:
        return matched
    return Matched([o for o in matched.objects if (o.steps[0].at if o.steps else o.accepted_at) >= when],
                   [run for run in matched.unkept if run[0].at >= when],
                   [(label, s) for label, s in matched.answers if s.at >= when], matched.skipped)
