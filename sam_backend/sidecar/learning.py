"""Learning's shared truth in the sidecar database (`SAM_METADATA_DB`: SQLite on one host, the PostgreSQL that
replicas share): accepted masks as Label Studio confirmed them, adapter versions, and each project's trainings.

- **Masks**: one row per (project, annotation, region), in arrival order (`id`). An annotation's rows are replaced in
  one transaction: no process rewrites another's rows, and a reader never sees half an update.
- **Versions**: numbered per (project, weights) inside the transaction that inserts them (SQLite's writer lock; a
  PostgreSQL transaction-level advisory lock), so two replicas never give two decoders one name. A version row is
  whole or absent: a process killed mid-write leaves the previous version the newest, and the newest is what every
  replica serves. Only the newest `keep` versions stay.
- **Trainings**: masks kept when a project was last trained, its last attempt, failures in a row and when a failed
  or impossible training may be tried again (the back-off).
- **One trainer per project** (`trainer`): a lock that dies with its process: a PostgreSQL session advisory lock,
  or an `flock` on a file in the lock folder (SQLite: one host).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam_backend.labelstudio.accepted import MaskRecord, positive_id
from sam_backend.sidecar.schema import utc_now

log = logging.getLogger(__name__)

_LOCK_NS = 0x53414D41  # "SAMA": PostgreSQL advisory locks of learning (the key's first half; the project the second)
_MASK_COLUMNS = "project, annotation_id, region, task_id, image_url, label, height, width, counts"


@dataclass(frozen=True)
class Version:
    """One stored version: its number, the packed decoder (`segment.adapt.pack_version` bytes) and its info."""

    project: str
    weights: str
    number: int
    data: bytes
    info: dict[str, Any]


@dataclass(frozen=True)
class Training:
    """A project's training record: masks kept when it last started, its last attempt, failures in a row, and the
    time (`time.time()`) before which it is not tried again."""

    attempted_at: int = 0
    last_attempt: dict[str, Any] | None = None
    failures: int = 0
    retry_at: float = 0.0


def _json_object(text: str | None) -> dict[str, Any] | None:
    """A stored JSON object, or None where the text is empty, torn or not an object."""
    try:
        found = json.loads(text) if text else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _project_key(project: str) -> int:
    """A project id as the integer half of an advisory lock key; `ValueError` for anything but a positive id."""
    key = positive_id(project)
    if key is None:
        raise ValueError(f"project: expected a positive integer id, got {project!r}")
    return key


class LearningStore:
    """Accepted masks, versions and trainings in the sidecar database (see the module docstring). `db` is the
    sidecar's `Store` or `PostgresStore`; `lock_dir` holds the SQLite trainers' lock files."""

    def __init__(self, db: Any, lock_dir: Path | str) -> None:
        self.db = db
        self.lock_dir = Path(lock_dir)
        self.m = db.mark
        self.postgres = db.mark == "%s"  # else SQLite

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.m)

    # -- masks ------------------------------------------------------------------------------------------------
    def replace_annotation(self, annotation_id: int, masks: list[MaskRecord]) -> int:
        """Make `masks` the rows of annotation `annotation_id` (in any project: Label Studio's ids are global);
        returns how many rows it had before."""
        return len(self.replace_regions(annotation_id, masks))

    def replace_regions(self, annotation_id: int, masks: list[MaskRecord]) -> set[str]:
        """`replace_annotation`, returning the region ids the annotation held before (read in the same
        transaction: which of `masks` are new)."""
        with self.db.transaction() as run:
            before = {r[0] for r in run(self._sql("SELECT region FROM accepted_masks WHERE annotation_id = ?"),
                                        (annotation_id,))}
            run(self._sql("DELETE FROM accepted_masks WHERE annotation_id = ?"), (annotation_id,))
            now = utc_now()
            for r in masks:
                run(self._sql(f"INSERT INTO accepted_masks ({_MASK_COLUMNS}, created_at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                    (r.project, r.annotation_id, r.region, r.task_id, r.image_url, r.label, r.height, r.width,
                     r.counts, now))
        return before

    def masks(self, project: str) -> list[MaskRecord]:
        """A project's accepted masks, oldest first."""
        rows = self.db.query(self._sql(f"SELECT {_MASK_COLUMNS} FROM accepted_masks WHERE project = ? ORDER BY id"),
                             (project,))
        return [MaskRecord(*row) for row in rows]

    def mask_count(self, project: str) -> int:
        return int(self.db.query(self._sql("SELECT COUNT(*) FROM accepted_masks WHERE project = ?"),
                                 (project,))[0][0])

    def projects(self) -> list[str]:
        """Every project with accepted masks or versions."""
        rows = self.db.query("SELECT project FROM accepted_masks UNION SELECT project FROM adapter_versions")
        return sorted({r[0] for r in rows}, key=lambda p: (len(p), p))

    # -- versions ---------------------------------------------------------------------------------------------
    def publish(self, project: str, weights: str, data: bytes, info: dict[str, Any], keep: int) -> int:
        """Store a new version of `project` on `weights` under the next number (allocated in this transaction);
        keeps only the newest `keep`; returns the number."""
        with self.db.transaction() as run:
            if self.postgres:  # PostgreSQL: one allocation per project at a time (SQLite's writer lock is global)
                run("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS + 1, _project_key(project)))
            number = int(run(self._sql("SELECT COALESCE(MAX(version), 0) + 1 FROM adapter_versions "
                                       "WHERE project = ? AND weights = ?"), (project, weights))[0][0])
            info = dict(info, version=number)
            run(self._sql("INSERT INTO adapter_versions (project, weights, version, data, info, created_at) "
                          "VALUES (?, ?, ?, ?, ?, ?)"), (project, weights, number, data, json.dumps(info), utc_now()))
            self._written(number)
            run(self._sql("DELETE FROM adapter_versions WHERE project = ? AND weights = ? AND version <= ?"),
                (project, weights, number - keep))
        return number

    def _written(self, number: int) -> None:
        """Runs after a version's row is written and before its transaction commits (a seam for the crash test)."""

    def newest(self, project: str, weights: str) -> int | None:
        """The newest version's number, without its bytes (a cheap poll)."""
        rows = self.db.query(self._sql("SELECT MAX(version) FROM adapter_versions WHERE project = ? AND weights = ?"),
                             (project, weights))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def version(self, project: str, weights: str, number: int | None = None) -> Version | None:
        """Version `number` (default: the newest), or None."""
        number = self.newest(project, weights) if number is None else number
        if number is None:
            return None
        rows = self.db.query(self._sql("SELECT data, info FROM adapter_versions WHERE project = ? AND weights = ? "
                                       "AND version = ?"), (project, weights, number))
        if not rows:
            return None
        data, info = rows[0]
        return Version(project, weights, number, bytes(data), _json_object(info) or {})

    def numbers(self, project: str, weights: str) -> list[int]:
        """The numbers of the versions kept, oldest first."""
        rows = self.db.query(self._sql("SELECT version FROM adapter_versions WHERE project = ? AND weights = ? "
                                       "ORDER BY version"), (project, weights))
        return [int(r[0]) for r in rows]

    def version_infos(self, project: str) -> list[dict[str, Any]]:
        """The kept versions of a project (every weights), oldest first, without their bytes: `version`,
        `weights`, `info` (what it was learnt from, its held-out scores) and `created_at` (when it went live)."""
        rows = self.db.query(self._sql("SELECT version, weights, info, created_at FROM adapter_versions "
                                       "WHERE project = ? ORDER BY created_at, version"), (project,))
        return [{"version": int(number), "weights": weights, "info": _json_object(info) or {}, "created_at": created}
                for number, weights, info, created in rows]

    # -- trainings --------------------------------------------------------------------------------------------
    def training(self, project: str, weights: str) -> Training:
        rows = self.db.query(self._sql("SELECT attempted_at, last_attempt, failures, retry_at FROM adapter_trainings "
                                       "WHERE project = ? AND weights = ?"), (project, weights))
        if not rows:
            return Training()
        attempted, last, failures, retry_at = rows[0]
        return Training(int(attempted), _json_object(last), int(failures), float(retry_at))

    def set_training(self, project: str, weights: str, training: Training) -> None:
        with self.db.transaction() as run:
            run(self._sql("INSERT INTO adapter_trainings (project, weights, attempted_at, last_attempt, failures, "
                          "retry_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project, weights) DO UPDATE SET "
                          "attempted_at = excluded.attempted_at, last_attempt = excluded.last_attempt, "
                          "failures = excluded.failures, retry_at = excluded.retry_at"),
                (project, weights, training.attempted_at,
                 json.dumps(training.last_attempt) if training.last_attempt is not None else None,
                 training.failures, training.retry_at))

    # -- one trainer per project ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def trainer(self, project: str) -> Iterator[bool]:
        """Hold the project's training lock while the block runs; yields False (and holds nothing) where another
        process holds it. The lock is released by the process's death as by the block's end."""
        key = _project_key(project)
        if self.postgres:
            conn = self.db.connect()
            try:
                got = bool(conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_NS, key)).fetchone()[0])
                yield got
            finally:
                conn.close()  # ends the session: the lock goes with it
            return
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_dir / f"train-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except BlockingIOError:
                got = False
            yield got
        finally:
            os.close(fd)  # closing the descriptor releases the flock
