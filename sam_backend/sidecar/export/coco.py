"""COCO writer: `coco.json` with one image per task and one annotation per object.

`segmentation` is compressed RLE, column-major (`pycocotools.mask`), `counts` as str, or with
`--polygons` COCO polygons on the pixels' outer edges (holes are lost: a warning says where); `bbox`
is `[x, y, width, height]` in pixels and `area` in pixels, both computed from the mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sam_backend.sidecar.export.reader import DecodedTask, ExportObject
from sam_backend.sidecar.export.writer import ExportOptions, TaskReport


class CocoWriter:
    name = "coco"

    def __init__(self, options: ExportOptions) -> None:
        self.options = options

    def prepare(self, work: Path) -> None:
        pass

    def write(self, task: DecodedTask, work: Path, report: TaskReport) -> None:
        image = {"id": task.task_id, "file_name": task.file_name, "width": task.width, "height": task.height}
        report.data[self.name] = (image, [self._annotation(task, obj, report) for obj in task.objects])

    def _annotation(self, task: DecodedTask, obj: ExportObject, report: TaskReport) -> dict[str, Any]:
        entry: dict[str, Any] = {"image_id": task.task_id, "category_id": obj.category, "iscrowd": 0,
                                 "attributes": obj.attributes, "area": obj.area, "bbox": obj.bbox}
        if obj.mask is None:
            entry["segmentation"] = []
            if obj.keypoint is not None:
                entry.update(keypoints=[*obj.keypoint, 2], num_keypoints=1)
        elif not self.options.polygons:
            entry["segmentation"] = obj.rle
        elif obj.ring is not None:
            entry["segmentation"] = [[float(v) for v in obj.ring.ravel()]]
        else:
            polygons, holes = obj.contours(self.options.tolerance_px)
            if holes:
                report.holes_lost += 1
                report.warnings.append(f"{obj.where}: holes dropped by --polygons (use RLE to keep them)")
            entry["segmentation"] = polygons
        return entry

    def finish(self, work: Path, categories: list[str], reports: list[TaskReport]) -> None:
        images, annotations = [], []
        for report in reports:
            if self.name not in report.data:
                continue
            image, entries = report.data[self.name]
            images.append(image)
            for entry in entries:
                entry["id"] = len(annotations) + 1
                annotations.append(entry)
        coco = {
            "info": {"description": "Label Studio annotations exported by sam-backend", "version": "1.0"},
            "licenses": [],
            "images": images,
            "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(categories)],
            "annotations": annotations,
        }
        (work / "coco.json").write_text(json.dumps(coco))
