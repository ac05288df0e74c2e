"""Sidecar in PostgreSQL (`SAM_METADATA_DB=postgresql://…`, psycopg 3): the SQLite store's schema and behaviour.

Same table, columns, indexes and migrations (numbered alike, recorded in `sam_schema_version`), the same
`record` / `history` / `count`; JSON columns are text as in SQLite, so `history` and the exporter read
identical rows. Replicas that start together migrate one at a time (a transaction-level advisory lock).
One connection per thread, autocommit; a connection that broke is replaced on the next call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sam_backend.sidecar.records import Interaction
from sam_backend.sidecar.schema import COLUMNS, StoreError, apply_migrations, decode_row, history_query, row_of
from sam_backend.sidecar.schema import MIGRATIONS as SQLITE_MIGRATIONS

log = logging.getLogger(__name__)

# SQLite's migrations in PostgreSQL's types: one schema, written once (sidecar/schema.py).
_TYPES = (("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY"), ("task_id INTEGER", "task_id BIGINT"),
          ("mask_area INTEGER", "mask_area BIGINT"), (" REAL", " DOUBLE PRECISION"), (" BLOB", " BYTEA"),
          ("annotation_id INTEGER", "annotation_id BIGINT"))


def postgres_ddl(sqlite_ddl: str) -> str:
    for old, new in _TYPES:
        sqlite_ddl = sqlite_ddl.replace(old, new)
    return sqlite_ddl


MIGRATIONS: tuple[str, ...] = tuple(postgres_ddl(m) for m in SQLITE_MIGRATIONS)
SCHEMA_VERSION = len(MIGRATIONS)
_LOCK_ID = 0x53414D  # "SAM": the advisory lock replicas take to migrate one at a time


class PostgresStore:
    """Thread-safe handle on one PostgreSQL database."""

    def __init__(self, url: str, connect_timeout_s: int = 3) -> None:
        import psycopg

        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._migrated = False
        try:
            self.migrate()
        except psycopg.OperationalError as exc:  # down at start: the first write that reaches it migrates
            log.warning("sidecar database (PostgreSQL) not reachable at start (%s); rows wait until it is",
                        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)

    def __repr__(self) -> str:  # never the password
        return "PostgresStore(<url>)"

    def _conn(self) -> Any:
        import psycopg

        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)
            self._local.conn = conn
        return conn

    def migrate(self) -> int:
        """Apply the migrations this database lacks; return the schema version. `psycopg.OperationalError` where
        the database cannot be reached; `StoreError` where it cannot be used."""
        import psycopg

        conn = self._conn()  # a connection error goes to the caller: the database is down, not broken
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
                cur.execute("CREATE TABLE IF NOT EXISTS sam_schema_version (version INTEGER NOT NULL)")
                cur.execute("SELECT version FROM sam_schema_version")
                found = cur.fetchone()
                version = found[0] if found else 0
                if found is None:
                    cur.execute("INSERT INTO sam_schema_version VALUES (0)")
                apply_migrations(MIGRATIONS, version, "the sidecar database", cur.execute,
                                 lambda number: cur.execute("UPDATE sam_schema_version SET version = %s", (number,)))
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the sidecar database (PostgreSQL): {str(exc).strip()[:300]}") from None
        self._migrated = True
        return SCHEMA_VERSION

    mark = "%s"  # the parameter placeholder of this database's SQL

    @contextmanager
    def transaction(self) -> Iterator[Callable[[str, Any], list[tuple]]]:
        """One transaction; yields `run(sql, args) -> rows`."""
        if not self._migrated:
            self.migrate()
        conn = self._conn()
        with conn.transaction(), conn.cursor() as cur:
            def run(sql: str, args: Any = ()) -> list[tuple]:
                cur.execute(sql, args)
                return [tuple(r) for r in cur.fetchall()] if cur.description else []

            yield run

    def query(self, sql: str, args: Any = ()) -> list[tuple]:
        """Rows of one read."""
        if not self._migrated:
            self.migrate()
        with self._conn().cursor() as cur:
            cur.execute(sql, args)
            return [tuple(r) for r in cur.fetchall()]

    def connect(self) -> Any:
        """A connection of its own (autocommit), for a session-level advisory lock held across calls."""
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)

    def record(self, item: Interaction) -> int | None:
        """Insert one interaction; returns its row id, or None where its request key is already kept."""
        if not self._migrated:
            self.migrate()
        row = row_of(item)
        names = ", ".join(row)
        marks = ", ".join(f"%({k})s" for k in row)
        with self._conn().cursor() as cur:
            cur.execute(f"INSERT INTO interactions ({names}) VALUES ({marks}) "
                        "ON CONFLICT (request_key) DO NOTHING RETURNING id", row)
            found = cur.fetchone()
        return None if found is None else int(found[0])

    def history(self, task: int | None = None, project: str | None = None, since: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        """Interactions, oldest first, filtered by task id, project and `created_at >= since` (ISO 8601)."""
        sql, args = history_query(task, project, since, limit, "%s")
        with self._conn().cursor() as cur:
            cur.execute(sql, args)
            return [decode_row(dict(zip(COLUMNS, r, strict=True))) for r in cur.fetchall()]

    def count(self) -> int:
        with self._conn().cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM interactions")
            return int(cur.fetchone()[0])
