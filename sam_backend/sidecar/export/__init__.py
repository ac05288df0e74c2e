"""Label Studio annotations → COCO with real masks, PNG masks, masked crops, YOLO-seg, ZIP.

`reader` turns each task into one decoded record; one writer per format (`coco`, `png`, `yolo`,
`crops`, behind `writer.Writer`) writes it; `driver` runs them in a process pool and moves the
result into place atomically. Frames and encodings are never mixed: always through `(H, W) bool`.
"""

from sam_backend.sidecar.export.driver import ExportSummary, export, fetch_project
from sam_backend.sidecar.export.reader import (
    ExportError,
    categories_from_config,
    categories_from_tasks,
    load_tasks,
    validate_tasks,
)
from sam_backend.sidecar.export.writer import ExportOptions

__all__ = ["ExportError", "ExportOptions", "ExportSummary", "categories_from_config", "categories_from_tasks",
           "export", "fetch_project", "load_tasks", "validate_tasks"]
