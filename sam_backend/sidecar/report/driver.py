"""`sam-backend report`: read one project's interaction log (the sidecar) and its accepted annotations (Label Studio's
API, read only), join them (`objects.match`), and write `report.json` and `report.html` into a folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sam_backend.fileio import write_atomic
from sam_backend.sidecar.report.figures import report_data
from sam_backend.sidecar.report.objects import match, parse_time, since
from sam_backend.sidecar.report.page import render

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """The report cannot be made: nothing logged for the project, an unreadable database, Label Studio refused."""


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    json: Path
    data: dict[str, Any]


def parse_since(text: str | None) -> datetime | None:
    """`--since`: a date (`2026-12-01`, midnight UTC) or an ISO 8601 time; `ReportError` otherwise."""
    if text is None:
        return None
    when = parse_time(text if "T" in text or " " in text else text + "T00:00:00")
    if when is None:
        raise ReportError(f"--since: expected a date (YYYY-MM-DD) or an ISO 8601 time, got {text!r}")
    return when


def read_log(target: str | Path, project: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The project's logged interactions (oldest first) and its kept adapter versions from the sidecar database."""
    from sam_backend.sidecar.learning import LearningStore
    from sam_backend.sidecar.store import StoreError, open_sidecar

    target = str(target)
    if "://" not in target and not Path(target).exists():
        raise ReportError(f"{target} does not exist: the backend has logged no interaction there (SAM_METADATA_DB)")
    try:
        db = open_sidecar(target if "://" in target else Path(target))
        rows = db.history(project=str(project))
        stored = LearningStore(db, ".").version_infos(str(project))
    except StoreError as exc:
        raise ReportError(str(exc)) from None
    except Exception as exc:  # psycopg's and sqlite3's errors: the database is down or not a sidecar
        raise ReportError(f"cannot read the sidecar database: {str(exc).strip()[:300]}") from None
    return rows, stored


def read_tasks(url: str | None, api_key: str | None, project: int) -> list[dict[str, Any]]:
    """The project's tasks with their annotations, as Label Studio exports them (read only)."""
    from sam_backend.sidecar.export import ExportError, fetch_project

    if not url or not api_key:
        raise ReportError("report needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read the accepted annotations")
    try:
        tasks, _config = fetch_project(url, api_key, project)
    except ExportError as exc:
        raise ReportError(str(exc)) from None
    return tasks


def build_report(project: int, out: Path, db: str | Path, url: str | None, api_key: str | None,
                 since_text: str | None = None, adapt: bool = False, progress: bool = True,
                 max_pixels: int | None = None) -> ReportPaths:
    """Write `out/report.json` and `out/report.html` for `project` (see the README's "What the team's clicks
    cost"); `ReportError` where there is nothing to report or something cannot be read."""
    from tqdm import tqdm

    from sam_backend.labelstudio.brush import DEFAULT_MAX_PIXELS

    when = parse_since(since_text)
    rows, stored = read_log(db, project)
    logged = [r for r in rows if when is None or (parse_time(r.get("created_at")) or when) >= when]
    if not logged:
        raise ReportError(f"project {project} has no logged interactions{' since ' + since_text if when else ''} in "
                          f"{db}: nothing to report (is SAM_METADATA_DB the backend's?)")
    tasks = read_tasks(url, api_key, project)
    with tqdm(total=len(tasks), desc=f"project {project}: matching annotations", unit="task",
              disable=not progress) as bar:
        matched = since(match(rows, tasks, max_pixels or DEFAULT_MAX_PIXELS, progress=lambda: bar.update()), when)
    data = report_data(matched, project, when, stored, adapt)
    page = render(data, [s.latency_ms for _label, s in matched.answers if s.latency_ms is not None])
    json_path, html_path = out / "report.json", out / "report.html"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, json.dumps(data, indent=1).encode())
        write_atomic(html_path, page.encode())
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    log.info("report of project %s: %d objects, %d hand-drawn, %d answers (%s)", project,
             data["totals"]["objects"], data["totals"]["hand_drawn"], data["totals"]["answers"],
             datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return ReportPaths(html_path, json_path, data)
