"""Crop writer: each masked object cut to its bounding box on a transparent background (RGBA PNG),
`crops/<task>_<stem>_<n>_<label>.png`. Downloads the task's image through the backend's image loader;
an unreachable image skips that task's crops with a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sam_backend.labelstudio.images import ImageError, ImageFetcher
from sam_backend.labelstudio.labelconfig import task_image_url
from sam_backend.sidecar.export.reader import DecodedTask
from sam_backend.sidecar.export.writer import ExportOptions, TaskReport, atomic_png, safe_name


class CropWriter:
    name = "crops"

    def __init__(self, options: ExportOptions, fetch_settings: Any = None) -> None:
        self.options = options
        self.fetch_settings = fetch_settings
        self._fetcher: ImageFetcher | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fetcher": None}  # each worker process opens its own HTTP session

    def prepare(self, work: Path) -> None:
        (work / "crops").mkdir(parents=True, exist_ok=True)

    def write(self, task: DecodedTask, work: Path, report: TaskReport) -> None:
        masked = [obj for obj in task.objects if obj.mask is not None]
        if not masked:
            return
        image = self._load(task, report)
        if image is None:
            return
        for obj in masked:
            path = work / "crops" / f"{task.task_id}_{task.stem}_{obj.index}_{safe_name(obj.label)}.png"
            x, y, w, h = (int(round(v)) for v in obj.bbox)
            rgba = np.dstack([image[y:y + h, x:x + w], obj.mask[y:y + h, x:x + w].astype(np.uint8) * 255])
            atomic_png(path, cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
            report.crops += 1

    def _load(self, task: DecodedTask, report: TaskReport) -> np.ndarray | None:
        if self._fetcher is None:
            self._fetcher = ImageFetcher(self.fetch_settings)
        try:
            pixels = self._fetcher.load(task_image_url(task.task)).pixels
        except ImageError as exc:
            report.unreachable = True
            report.warnings.append(f"task {task.task_id}: image unreachable, crops skipped ({exc.message})")
            return None
        if pixels.shape[:2] != (task.height, task.width):
            pixels = cv2.resize(pixels, (task.width, task.height), interpolation=cv2.INTER_AREA)
        return pixels

    def finish(self, work: Path, categories: list[str], reports: list[TaskReport]) -> None:
        pass
