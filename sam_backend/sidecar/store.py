"""Sidecar SQLite store: one row per interactive prediction, no image or mask blobs.

WAL journal, a busy timeout, `BEGIN IMMEDIATE` for writes (so concurrent writers queue instead of
failing on upgrade), and the schema versioned by `PRAGMA user_version` with ordered migrations.
Masks are kept as a COCO annotation (compressed RLE, column-major, pycocotools) in JSON.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from sam_backend.sidecar.records import Interaction
from sam_backend.sidecar.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    StoreError,
    apply_migrations,
    decode_row,
    history_query,
    row_of,
    utc_now,
)

log = logging.getLogger(__name__)

def open_sidecar(target: Path | str) -> Any:
    """The interaction store `SAM_METADATA_DB` names: `postgresql://…` (PostgreSQL) or a SQLite file path."""
    if str(target).startswith(("postgresql://", "postgres://")):
        from sam_backend.sidecar.postgres import PostgresStore

        return PostgresStore(str(target))
    return Store(target)


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

    mark = "?"  # the parameter placeholder of this database's SQL

    @contextmanager
    def transaction(self) -> Iterator[Callable[[str, Any], list[tuple]]]:
        """One write transaction (`BEGIN IMMEDIATE`: writers queue); yields `run(sql, args) -> rows`."""
        with self._write() as conn:
            yield lambda sql, args=(): [tuple(r) for r in conn.execute(sql, args).fetchall()]

    def query(self, sql: str, args: Any = ()) -> list[tuple]:
        """Rows of one read."""
        return [tuple(r) for r in self._conn().execute(sql, args).fetchall()]

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
