"""The report's one figure that is cheap to keep live (`/metrics`): the prompts each newly accepted region took.

Called when Label Studio has confirmed an annotation (`SAM_ADAPT`'s webhook intake); reads only that region's task
from the interaction log (an indexed query) and applies `objects.steps_for`, the report's own rule."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sam_backend.labelstudio.accepted import MaskRecord
from sam_backend.sidecar.report.objects import steps_for


def clicks_of_accepted(db: Any, masks: list[MaskRecord]) -> list[tuple[str | None, int]]:
    """Per accepted region: its label and the prompts the backend answered for it (0: drawn by hand). `db` is the
    sidecar store (`history(task=…)`)."""
    now = datetime.now(timezone.utc)
    rows_of: dict[int, list[dict[str, Any]]] = {}
    out = []
    for mask in masks:
        if mask.task_id is None:
            out.append((mask.label, 0))
            continue
        if mask.task_id not in rows_of:
            rows_of[mask.task_id] = db.history(task=mask.task_id)
        rle = {"size": [mask.height, mask.width], "counts": mask.counts.encode("ascii")}
        out.append((mask.label, len(steps_for(rows_of[mask.task_id], mask.task_id, mask.label, rle, now))))
    return out
