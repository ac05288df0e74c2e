"""The sidecar's one schema: the interaction table and its migrations, the row a record becomes, the row
`history` gives back, and the `history` query. SQLite (`sidecar.store`) and PostgreSQL (`sidecar.postgres`)
both use it."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sam_backend.segment.masks import mask_to_coco
from sam_backend.sidecar.records import Interaction

MIGRATIONS: tuple[str, ...] = (
    # 1: the interaction log
    """
    CREATE TABLE interactions (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        project TEXT,
        task_id INTEGER,
        image_id TEXT NOT NULL,
        image_url TEXT,
        prompt TEXT NOT NULL,
        click_x REAL,
        click_y REAL,
        bbox TEXT,
        engine TEXT,
        model_version TEXT,
        label TEXT,
        score REAL,
        mask_bbox TEXT,
        mask_area INTEGER,
        latency_ms REAL,
        cache_hit INTEGER,
        coco_annotation TEXT
    );
    CREATE INDEX ix_interactions_task ON interactions (task_id, created_at);
    CREATE INDEX ix_interactions_project ON interactions (project, created_at);
    CREATE INDEX ix_interactions_created ON interactions (created_at);
    """,
    # 2: one row per request id (a click retried on another replica is kept once)
    """
    ALTER TABLE interactions ADD COLUMN request_key TEXT;
    CREATE UNIQUE INDEX ux_interactions_request ON interactions (request_key);
    """,
    # 3: learning from the team (sidecar.learning): accepted masks as Label Studio confirmed them (COCO RLE, one row
    # per annotation region, in arrival order), adapter versions (numbered per project and weights), the trainings
    """
    CREATE TABLE accepted_masks (
        id INTEGER PRIMARY KEY,
        project TEXT NOT NULL,
        annotation_id INTEGER NOT NULL,
        region TEXT NOT NULL,
        task_id INTEGER,
        image_url TEXT NOT NULL,
        label TEXT,
        height INTEGER NOT NULL,
        width INTEGER NOT NULL,
        counts TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE UNIQUE INDEX ux_accepted_region ON accepted_masks (project, annotation_id, region);
    CREATE INDEX ix_accepted_annotation ON accepted_masks (annotation_id);
    CREATE TABLE adapter_versions (
        project TEXT NOT NULL,
        weights TEXT NOT NULL,
        version INTEGER NOT NULL,
        data BLOB NOT NULL,
        info TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (project, weights, version)
    );
    CREATE TABLE adapter_trainings (
        project TEXT NOT NULL,
        weights TEXT NOT NULL,
        attempted_at INTEGER NOT NULL,
        last_attempt TEXT,
        failures INTEGER NOT NULL,
        retry_at REAL NOT NULL,
        PRIMARY KEY (project, weights)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
COLUMNS = ("id", "created_at", "project", "task_id", "image_id", "image_url", "prompt", "click_x", "click_y", "bbox",
           "engine", "model_version", "label", "score", "mask_bbox", "mask_area", "latency_ms", "cache_hit",
           "coco_annotation", "request_key")
_JSON_COLUMNS = ("prompt", "bbox", "mask_bbox", "coco_annotation")


class StoreError(RuntimeError):
    """The database cannot be opened or is newer than this program."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def apply_migrations(migrations: tuple[str, ...], version: int, where: str, execute: Callable[[str], object],
                     set_version: Callable[[int], object]) -> None:
    """Run the migrations after `version` in order, each statement through `execute`, recording each new
    version with `set_version`; `StoreError` where the database is newer than this program."""
    if version > len(migrations):
        raise StoreError(f"{where} has schema version {version}, newer than this program's {len(migrations)}; "
                         "upgrade sam-backend")
    for number in range(version, len(migrations)):
        for statement in migrations[number].split(";"):
            if statement.strip():
                execute(statement)
        set_version(number + 1)


def row_of(item: Interaction) -> dict[str, Any]:
    """The column values of one interaction (JSON columns as text), for any of the stores."""
    points = item.prompt.get("points") or []
    coco = mask_to_coco(item.mask, item.label) if item.mask is not None else None
    return {
        "created_at": item.created_at or utc_now(),
        "project": None if item.project is None else str(item.project),
        "task_id": item.task_id,
        "image_id": item.image_id,
        "image_url": item.image_url,
        "prompt": json.dumps(item.prompt),
        "click_x": points[0][0] if points else None,
        "click_y": points[0][1] if points else None,
        "bbox": json.dumps(item.prompt.get("box")),
        "engine": item.engine,
        "model_version": item.model_version,
        "label": item.label,
        "score": item.score,
        "mask_bbox": json.dumps(coco["bbox"]) if coco else None,
        "mask_area": coco["area"] if coco else None,
        "latency_ms": item.latency_ms,
        "cache_hit": None if item.cache_hit is None else int(bool(item.cache_hit)),
        "coco_annotation": json.dumps(coco) if coco else None,
        "request_key": item.request_key,
    }


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as `history` gives it: JSON columns parsed, `cache_hit` a bool."""
    for key in _JSON_COLUMNS:
        if row[key] is not None:
            row[key] = json.loads(row[key])
    row["cache_hit"] = None if row["cache_hit"] is None else bool(row["cache_hit"])
    return row


def history_query(task: int | None, project: str | None, since: str | None, limit: int | None,
                  mark: str) -> tuple[str, list[Any]]:
    """The `history` SELECT (oldest first) with `mark` as the parameter placeholder, and its arguments."""
    where, args = [], []
    if task is not None:
        where.append(f"task_id = {mark}")
        args.append(task)
    if project is not None:
        where.append(f"project = {mark}")
        args.append(str(project))
    if since is not None:
        where.append(f"created_at >= {mark}")
        args.append(since)
    sql = f"SELECT {', '.join(COLUMNS)} FROM interactions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at, id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, args
