"""Sidecar SQLite: rows, filters, migrations, concurrent writers in two processes, the history command."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from sam_backend.commands.cli import main
from sam_backend.sidecar.records import Interaction
from sam_backend.sidecar.store import SCHEMA_VERSION, Store, StoreError


def fields(task_id=1, project="3", created_at=None, mask=True):
    m = np.zeros((40, 60), bool)
    m[10:20, 5:25] = True
    return Interaction(project=project, task_id=task_id, image_id="ab" * 32, image_url="/data/upload/3/x.png",
                       prompt={"points": [[12.5, 14.0, 1], [30.0, 5.0, 0]], "box": [1.0, 2.0, 50.0, 30.0],
                               "label": "Cat"},
                       engine="grabcut/640/5", model_version="v", score=0.9, mask=m if mask else None,
                       label="Cat", latency_ms=12.5, cache_hit=True, created_at=created_at)


def test_record_and_read_back(tmp_path):
    store = Store(tmp_path / "a.db")
    row_id = store.record(fields())
    [row] = store.history()
    assert row["id"] == row_id and row["task_id"] == 1 and row["project"] == "3"
    assert (row["click_x"], row["click_y"]) == (12.5, 14.0) and row["bbox"] == [1.0, 2.0, 50.0, 30.0]
    assert row["mask_area"] == 200 and row["mask_bbox"] == [5.0, 10.0, 20.0, 10.0] and row["cache_hit"] is True
    coco = row["coco_annotation"]
    decoded = mask_utils.decode({"size": coco["segmentation"]["size"], "counts": coco["segmentation"]["counts"]})
    assert decoded.sum() == 200 and coco["category"] == "Cat"
    assert row["created_at"].endswith("+00:00")


def test_filters(tmp_path):
    store = Store(tmp_path / "a.db")
    store.record(fields(1, "3", "2026-01-01T00:00:00.000+00:00"))
    store.record(fields(2, "3", "2026-02-01T00:00:00.000+00:00"))
    store.record(fields(2, "4", "2026-03-01T00:00:00.000+00:00"))
    assert [r["task_id"] for r in store.history(task=2)] == [2, 2]
    assert [r["project"] for r in store.history(project="3")] == ["3", "3"]
    assert len(store.history(since="2026-02-01")) == 2
    assert len(store.history(task=2, project="4")) == 1


def test_schema_version_and_newer_file_refused(tmp_path):
    path = tmp_path / "a.db"
    Store(path).record(fields())
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Store(path)  # reopening migrates nothing and keeps the rows
    assert Store(path).count() == 1
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this program"):
        Store(path)


def _writer(path: str, offset: int, n: int) -> None:
    store = Store(path)
    for i in range(n):
        store.record(fields(task_id=offset + i, mask=False))


def test_two_processes_insert_at_once(tmp_path):
    path = str(tmp_path / "a.db")
    Store(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, k * 1000, 300)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert Store(path).count() == 600
    assert len({r["task_id"] for r in Store(path).history()}) == 600


def test_history_command(tmp_path):
    path = tmp_path / "a.db"
    store = Store(path)
    store.record(fields(5))
    store.record(fields(6))
    result = CliRunner().invoke(main, ["history", "--db", str(path), "--task", "5", "--json"])
    assert result.exit_code == 0
    [line] = result.output.strip().splitlines()
    assert json.loads(line)["task_id"] == 5
    table = CliRunner().invoke(main, ["history", "--db", str(path)])
    assert table.exit_code == 0 and "Cat" in table.output and table.output.count("\n") >= 3
    missing = CliRunner().invoke(main, ["history", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
