"""The interface every export format implements, and the per-task report the writers fill.

A writer is built once in the parent with the options, `prepare`s its folders, then `write`s each
decoded task (in worker processes: it must pickle, and keep nothing between tasks but its settings),
and `finish`es in the parent with what its `write` calls left in the reports (`report.data[name]`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from sam_backend.sidecar.export.reader import DecodedTask, ExportError


@dataclass(frozen=True)
class ExportOptions:
    """What to write; `tolerance_px` simplifies polygons (Douglas-Peucker, pixels)."""

    polygons: bool = False
    tolerance_px: float = 0.5
    masks: bool = True
    crops: bool = False
    yolo: bool = True
    jobs: int = 0  # 0: one per CPU
    progress: bool = True


@dataclass
class TaskReport:
    """What writing one task produced besides files: counters, warnings, and data for `finish`."""

    crops: int = 0
    unreachable: bool = False
    holes_lost: int = 0
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class Writer(Protocol):
    """One output format."""

    name: str

    def prepare(self, work: Path) -> None:
        """Create this format's folders under the export's work folder (parent process)."""
        ...

    def write(self, task: DecodedTask, work: Path, report: TaskReport) -> None:
        """Write one task's files (worker process)."""
        ...

    def finish(self, work: Path, categories: list[str], reports: list[TaskReport]) -> None:
        """Write the files that cover all tasks (parent process)."""
        ...


def atomic_png(path: Path, array: np.ndarray) -> None:
    """Encode `array` as PNG and move it into place (never a half-written file under the final name)."""
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ExportError(f"cannot encode {path.name}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def safe_name(name: str) -> str:
    """A label as a file-name part: letters, digits, '-' and '_' only, at most 40 characters."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
