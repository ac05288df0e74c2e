"""Rectangles a task already has, read for turning into masks (`sam-backend preannotate`, Retrieve Predictions).

A task's rectangles come from its newest live annotation (not cancelled; newest by `updated_at`, then `created_at`,
then id) and/or its newest prediction (a detector's boxes imported as predictions), skipping predictions this
backend wrote itself (`own_versions`). Each rectangle is a Label Studio `rectanglelabels` result: percent geometry of
`original_width` × `original_height`, origin top-left, `rotation` in degrees. Nothing here changes a task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SOURCES = ("annotations", "predictions", "both")
RECT_TYPES = ("rectanglelabels", "rectangle")


@dataclass(frozen=True)
class SourceRect:
    """One rectangle result as Label Studio stored it, its label (None: unlabeled) and where it came from."""

    result: Mapping[str, Any]
    label: str | None
    source: str  # "annotation" or "prediction"

    @property
    def rotation(self) -> float:
        value = self.result.get("value") or {}
        try:
            return float(value.get("rotation") or 0.0)
        except (TypeError, ValueError):
            return 0.0

    @property
    def region_id(self) -> str | None:
        rid = self.result.get("id")
        return str(rid) if rid is not None else None

    def as_context(self, index: int) -> dict[str, Any]:
        """The rectangle as the smart rectangle tool sends it in a `/predict` context (an id made up if it has none)."""
        return {**self.result, "id": self.region_id or f"box{index}"}

    def unusable(self, labels: tuple[str, ...], control: str) -> tuple[str, str] | None:
        """`(problem, detail)` where this rectangle cannot become a mask of the brush control `control` offering
        `labels` (rotated: SAM takes axis-aligned boxes; a label the control lacks), else None."""
        if abs(self.rotation) > 1e-6:
            return "rotated rectangle", (f"region {self.region_id}: rotation {self.rotation:g}°; SAM takes "
                                         "axis-aligned boxes, this one is left as it is")
        if self.label is not None and labels and self.label not in labels:
            return "label not in brush control", (f"region {self.region_id}: {self.label!r}; {control} offers "
                                                  f"{', '.join(labels)}")
        return None


def _stamp(item: Mapping[str, Any]) -> tuple[str, str, int]:
    rid = item.get("id")
    return (str(item.get("updated_at") or ""), str(item.get("created_at") or ""), rid if isinstance(rid, int) else 0)


def newest_live_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The task's newest annotation that was not cancelled (skipped), or None."""
    live = [a for a in task.get("annotations") or [] if isinstance(a, Mapping) and not a.get("was_cancelled")]
    return max(live, key=_stamp) if live else None


def newest_prediction(task: Mapping[str, Any], own_versions: Iterable[str] = ()) -> Mapping[str, Any] | None:
    """The task's newest prediction not written by this backend (`own_versions`), or None."""
    own = set(own_versions)
    preds = [p for p in task.get("predictions") or [] if isinstance(p, Mapping) and p.get("model_version") not in own]
    return max(preds, key=_stamp) if preds else None


def has_masks(item: Mapping[str, Any]) -> bool:
    """Whether an annotation or prediction holds mask regions (brush or polygon) already."""
    return any(isinstance(r, Mapping) and r.get("type") in ("brushlabels", "polygonlabels")
               for r in item.get("result") or [])


def rectangles_of(item: Mapping[str, Any] | None, source: str) -> list[SourceRect]:
    """The rectangle results of one annotation or prediction."""
    if item is None or not isinstance(item.get("result"), list):
        return []
    out = []
    for r in item["result"]:
        if not isinstance(r, Mapping) or r.get("type") not in RECT_TYPES or not isinstance(r.get("value"), Mapping):
            continue
        labels = r["value"].get("rectanglelabels") or []
        out.append(SourceRect(r, str(labels[0]) if labels else None, source))
    return out


def task_rectangles(task: Mapping[str, Any], source: str = "annotations", own_versions: Iterable[str] = ()
                    ) -> list[SourceRect]:
    """The rectangles to turn into masks: of the newest live annotation, the newest prediction, or both."""
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
    rects: list[SourceRect] = []
    if source in ("annotations", "both"):
        rects += rectangles_of(newest_live_annotation(task), "annotation")
    if source in ("predictions", "both"):
        rects += rectangles_of(newest_prediction(task, own_versions), "prediction")
    return rects


def rectangles_to_answer(tasks: Iterable[Mapping[str, Any]], labels: Iterable[str], output: str,
                         own_versions: Iterable[str] = ()) -> list[tuple[Mapping[str, Any], list[SourceRect]]] | None:
    """`[(task, its usable rectangles)]` where a request without a context (Label Studio's Retrieve Predictions, or a
    task opened with "use predictions to prelabel") carries tasks with rectangles: those of the newest live
    annotation, else of the newest prediction not written by this backend (`own_versions`); a task whose newest
    annotation holds masks already is left alone. None where no task has one. A rectangle that cannot be used
    (`SourceRect.unusable` for the target's `labels` and `output`) is left out with a warning."""
    labels = tuple(labels)
    found = []
    for task in tasks:
        annotation = newest_live_annotation(task)
        if annotation is not None and has_masks(annotation):  # labeled with masks already: left alone
            found.append((task, []))
            continue
        rects = rectangles_of(annotation, "annotation") or task_rectangles(task, "predictions", own_versions)
        usable = []
        for rect in rects:
            why = rect.unusable(labels, output)
            if why is None:
                usable.append(rect)
            else:
                log.warning("task %s: %s, left out (%s)", task.get("id"), *why)
        found.append((task, usable))
    return found if any(rects for _, rects in found) else None
