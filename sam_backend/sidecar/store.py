"""Sidecar SQLite store: one row per interactive prediction, no image or mask blobs.

WAL journal, a busy timeout, `BEGIN IMMEDIATE` for writes (so concurrent writers queue instead of
failing on upgrade), and the schema versioned by `PRAGMA user_version` with ordered migrations.
Masks are kept as a COCO annotation (compressed RLE, column-major, pycocotools) in JSON.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sam_backend.segment.masks import mask_to_coco
from sam_backend.sidecar.records import Interaction

log = logging.getLogger(__name__)

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


def open_sidecar(target: Path | str) -> Any:
    """The interaction store `SAM_METADATA_DB` names: `postgresql://…` (PostgreSQL) or a SQLite file path."""
    if str(target).startswith(("postgresql://", "postgres://")):
        from sam_backend.sidecar.postgres import PostgresStore

        return PostgresStore(str(target))
    return Store(target)


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


class Store:
    """Thread-safe handle: one connection per thread, all on the same file."""

    def __init__(self, path: Path | str, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self.migrate()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the sidecar database {self.path}: {exc}") from None
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def migrate(self) -> int:
        """Apply the migrations this file lacks; return the schema version."""
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            apply_migrations(MIGRATIONS, version, str(self.path), conn.execute,
                             lambda number: conn.execute(f"PRAGMA user_version = {number}"))
        return SCHEMA_VERSION

    def record(self, item: Interaction) -> int | None:
        """Insert one interaction; returns its row id, or None where its request key is already kept."""
        row = row_of(item)
        names = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._write() as conn:
            cur = conn.execute(f"INSERT INTO interactions ({names}) VALUES ({marks}) "
                               "ON CONFLICT (request_key) DO NOTHING", row)
            return int(cur.lastrowid) if cur.rowcount else None

    def history(self, task: int | None = None, project: str | None = None, since: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        """Interactions, oldest first, filtered by task id, project and `created_at >= since` (ISO 8601)."""
        sql, args = history_query(task, project, since, limit, "?")
        return [decode_row(dict(r)) for r in self._conn().execute(sql, args)]

    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM interactions").fetchone()[0])


def _transient(exc: BaseException) -> bool:
    """True for a database that is down or busy (the row waits and is written later), False for a row that
    cannot be written at all."""
    if isinstance(exc, (sqlite3.OperationalError, OSError, ConnectionError)):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


class AsyncRecorder:
    """Writes interactions on a background thread so a click never waits for the database or RLE encoding.

    While the database is down or busy, rows wait in a bounded buffer (`max_pending`) and are written, in
    order, when it answers again (retried with a growing pause, up to `retry_max_s`). A row that cannot be
    kept (the buffer is full, or the row itself is refused) is logged and handed to `on_lost(reason)`
    (`queue_full` or `write_failed`), which the backend counts in `/metrics`; none is dropped silently.

    `confirm_s`: `confirm(events)` waits up to this long for a request's rows to be written (while the database
    answers), so a process killed right after answering a click has written them; 0 never waits. The app calls
    it after the answer is serialised, so the write overlaps the rest of the click.
    """

    def __init__(self, store: Any, max_pending: int = 10_000, confirm_s: float = 0.0,
                 retry_max_s: float = 5.0) -> None:
        self.store = store
        self.confirm_s = confirm_s
        self.retry_max_s = retry_max_s
        self.on_lost: Callable[[str], None] = lambda reason: None
        self.down = False
        self._queue: queue.Queue[tuple[Interaction, threading.Event] | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="sidecar-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def __call__(self, item: Interaction) -> threading.Event | None:
        """Queue `item`; returns the event set once it is written (or given up), None where it was not queued."""
        item = replace(item, created_at=item.created_at or utc_now())
        written = threading.Event()
        try:
            self._queue.put_nowait((item, written))
        except queue.Full:
            log.warning("sidecar buffer full (%d rows waiting): interaction on task %s not recorded",
                        self._queue.maxsize, item.task_id)
            self.on_lost("queue_full")
            return None
        return written

    def confirm(self, written: list[threading.Event]) -> None:
        """Wait up to `confirm_s` in all for these rows to be written (not at all while the database is down)."""
        deadline = time.monotonic() + self.confirm_s
        for event in written:
            if self.down:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            event.wait(left)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued interaction is written (or has failed); False on timeout."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is not None:
                    self._write(*entry)
            finally:
                self._queue.task_done()

    def _write(self, item: Interaction, written: threading.Event) -> None:
        pause = 0.2
        while True:
            try:
                self.store.record(item)
            except Exception as exc:
                if _transient(exc):
                    if not self.down:
                        log.warning("sidecar database unavailable (%s); rows wait in memory (%d now) and are "
                                    "written when it is back", str(exc).strip().splitlines()[0][:200] if str(exc)
                                    else type(exc).__name__, self._queue.qsize() + 1)
                    self.down = True
                    written.set()  # nobody waits for a database that is down
                    time.sleep(pause)
                    pause = min(self.retry_max_s, pause * 2)
                    continue
                log.error("sidecar write failed for task %s, interaction not recorded: %s", item.task_id, exc)
                self.on_lost("write_failed")
                written.set()
                return
            if self.down:
                log.warning("sidecar database is back: writing the rows that waited")
                self.down = False
            written.set()
            return
