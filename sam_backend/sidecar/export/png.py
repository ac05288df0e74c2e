"""PNG mask writer: per object `masks/<task>_<stem>_<n>_<label>.png` (0/255), and per task a 16-bit
instance PNG (object n = n) and an 8-bit semantic PNG (category id)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sam_backend.sidecar.export.reader import DecodedTask
from sam_backend.sidecar.export.writer import ExportOptions, TaskReport, atomic_png, safe_name


class PngWriter:
    name = "masks"

    def __init__(self, options: ExportOptions) -> None:
        self.options = options

    def prepare(self, work: Path) -> None:
        (work / "masks").mkdir(parents=True, exist_ok=True)

    def write(self, task: DecodedTask, work: Path, report: TaskReport) -> None:
        out = work / "masks"
        instances = np.zeros((task.height, task.width), np.uint16)
        semantic = np.zeros((task.height, task.width), np.uint8)
        for obj in task.objects:
            if obj.mask is None:
                continue
            instances[obj.mask] = obj.index
            semantic[obj.mask] = obj.category
            atomic_png(out / f"{task.task_id}_{task.stem}_{obj.index}_{safe_name(obj.label)}.png",
                       obj.mask.astype(np.uint8) * 255)
        if task.objects:
            atomic_png(out / f"{task.task_id}_{task.stem}_instances.png", instances)
            atomic_png(out / f"{task.task_id}_{task.stem}_semantic.png", semantic)

    def finish(self, work: Path, categories: list[str], reports: list[TaskReport]) -> None:
        pass
