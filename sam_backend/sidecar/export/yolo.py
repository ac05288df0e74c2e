"""YOLO-seg writer: `yolo/labels/<stem>.txt` with lines `class x1 y1 x2 y2 ...` normalised to 0..1,
class = category id - 1, and `yolo/data.yaml`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sam_backend.sidecar.export.reader import DecodedTask
from sam_backend.sidecar.export.writer import ExportOptions, TaskReport


class YoloWriter:
    name = "yolo"

    def __init__(self, options: ExportOptions) -> None:
        self.options = options

    def prepare(self, work: Path) -> None:
        (work / "yolo" / "labels").mkdir(parents=True, exist_ok=True)

    def write(self, task: DecodedTask, work: Path, report: TaskReport) -> None:
        lines = []
        for obj in task.objects:
            if obj.mask is None:
                continue
            if self.options.polygons and obj.ring is not None:
                polygons = [[float(v) for v in obj.ring.ravel()]]
            else:
                polygons, holes = obj.contours(self.options.tolerance_px)
                if holes:
                    report.warnings.append(f"{obj.where}: holes dropped in YOLO-seg (its polygons cannot hold them)")
            for poly in polygons:
                xy = np.asarray(poly).reshape(-1, 2) / [task.width, task.height]
                lines.append(f"{obj.category - 1} " + " ".join(f"{v:.6f}" for v in np.clip(xy, 0, 1).ravel()))
        (work / "yolo" / "labels" / f"{task.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))

    def finish(self, work: Path, categories: list[str], reports: list[TaskReport]) -> None:
        names = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(categories))
        (work / "yolo" / "data.yaml").write_text(
            "# YOLO-seg dataset written by sam-backend; put the images in yolo/images/ (same stems as labels/).\n"
            f"path: .\ntrain: images\nval: images\nnc: {len(categories)}\nnames:\n{names}\n")
