"""Export driver: tasks → decoded records → every enabled format writer, in a process pool, into a
temporary folder that is renamed into place (or zipped) only when the whole export succeeded, so a
bad input leaves no partial output.

Formats are registered in `FORMATS`: adding one is a new writer module and one line here.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam_backend.sidecar.export.coco import CocoWriter
from sam_backend.sidecar.export.crops import CropWriter
from sam_backend.sidecar.export.png import PngWriter
from sam_backend.sidecar.export.reader import ExportError, decode_task, file_names, validate_tasks
from sam_backend.sidecar.export.writer import ExportOptions, TaskReport, Writer
from sam_backend.sidecar.export.yolo import YoloWriter

log = logging.getLogger(__name__)


def _writers(options: ExportOptions, fetch_settings: Any) -> list[Writer]:
    """The formats this export writes, in order. Register a new format here."""
    formats: list[tuple[bool, Writer]] = [
        (True, CocoWriter(options)),
        (options.masks, PngWriter(options)),
        (options.yolo, YoloWriter(options)),
        (options.crops, CropWriter(options, fetch_settings)),
    ]
    return [writer for wanted, writer in formats if wanted]


@dataclass
class ExportSummary:
    tasks: int = 0
    images: int = 0
    annotations: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    crops: int = 0
    images_unreachable: int = 0
    tasks_without_regions: int = 0
    holes_lost: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["warnings"] = self.warnings[:50]
        return data


@dataclass(frozen=True)
class _TaskExporter:
    """Decodes one task and hands it to every writer; picklable, sent to the worker processes."""

    work: Path
    categories: dict[str, int]
    writers: tuple[Writer, ...]

    def __call__(self, item: tuple[int, dict[str, Any], str]) -> tuple[TaskReport, dict[str, int] | None]:
        index, task, file_name = item
        decoded = decode_task(index, task, file_name, self.categories)
        report = TaskReport()
        if decoded is None:
            return report, None
        report.warnings.extend(decoded.warnings)
        for writer in self.writers:
            writer.write(decoded, self.work, report)
        by_type: dict[str, int] = {}
        for obj in decoded.objects:
            by_type[obj.kind] = by_type.get(obj.kind, 0) + 1
        return report, by_type


def export(tasks: list[dict[str, Any]], categories: list[str], dest: Path, options: ExportOptions | None = None,
           fetch_settings: Any = None, zip_path: Path | None = None, overwrite: bool = False) -> ExportSummary:
    """Export `tasks` into folder `dest` (or a ZIP at `zip_path`); returns what was written."""
    options = options or ExportOptions()
    target = zip_path or dest
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not empty; choose another path or pass --overwrite")
    if not categories:
        raise ExportError("no categories: the label config has no labels and the annotations name none")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        summary = _export_into(work, tasks, categories, options, fetch_settings)
        if zip_path is not None:
            tmp_zip = zip_path.with_name(zip_path.name + ".tmp")
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(work.rglob("*")):
                    if path.is_file():
                        zf.write(path, path.relative_to(work).as_posix())
            os.replace(tmp_zip, zip_path)
        elif dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(work, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, dest)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export_into(work: Path, tasks: list[dict[str, Any]], categories: list[str], options: ExportOptions,
                 fetch_settings: Any) -> ExportSummary:
    writers = _writers(options, fetch_settings)
    for writer in writers:
        writer.prepare(work)
    exporter = _TaskExporter(work, {n: i + 1 for i, n in enumerate(categories)}, tuple(writers))
    summary = ExportSummary(tasks=len(tasks))
    reports = []
    items = [(i, t, n) for i, (t, n) in enumerate(zip(tasks, file_names(tasks), strict=True))]
    for report, by_type in _run(exporter, items, options):
        summary.warnings.extend(report.warnings)
        summary.crops += report.crops
        summary.images_unreachable += int(report.unreachable)
        summary.holes_lost += report.holes_lost
        if by_type is None:
            summary.tasks_without_regions += 1
            continue
        summary.images += 1
        reports.append(report)
        for kind, n in by_type.items():
            summary.by_type[kind] = summary.by_type.get(kind, 0) + n
            summary.annotations += n
    for writer in writers:
        writer.finish(work, categories, reports)
    for warning in summary.warnings[:20]:
        log.warning("%s", warning)
    if len(summary.warnings) > 20:
        log.warning("... and %d more warnings", len(summary.warnings) - 20)
    return summary


def _run(exporter: _TaskExporter, items: list[tuple[int, dict[str, Any], str]], options: ExportOptions
         ) -> Iterator[tuple[TaskReport, dict[str, int] | None]]:
    jobs = options.jobs or os.cpu_count() or 1
    bar = tqdm(total=len(items), unit="task", desc="export", disable=not options.progress)
    try:
        if jobs <= 1 or len(items) < 8:
            for item in items:
                yield exporter(item)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
            with ctx.Pool(jobs) as pool:
                for out in pool.imap(exporter, items, chunksize=8):
                    yield out
                    bar.update(1)
    finally:
        bar.close()


def fetch_project(base_url: str, api_key: str | None, project: int, timeout_s: float = 300.0
                  ) -> tuple[list[dict[str, Any]], str]:
    """Read a project's label config and its JSON export from Label Studio's API."""
    import requests

    from sam_backend.errors import ClientError
    from sam_backend.labelstudio.client import LabelStudioClient

    if not api_key:
        raise ExportError("--project needs LABEL_STUDIO_API_KEY (a personal access token)")
    client = LabelStudioClient(base_url, api_key)
    try:
        config = client.project(project).get("label_config") or ""
        data = client.call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON"},
                           timeout=timeout_s).json()
    except ClientError as exc:
        raise ExportError(exc.message) from None
    except (RuntimeError, requests.RequestException, ValueError) as exc:
        raise ExportError(f"reading project {project} from {client.url} failed: {exc}") from None
    return validate_tasks(data, f"project {project}"), config
