"""Learning across replicas: accepted masks and versions in one database (a real PostgreSQL on 127.0.0.1, or one
SQLite file), version numbers allocated once across processes, a process killed with SIGKILL while it writes a version,
and two `sam-backend serve` processes on one PostgreSQL taking webhooks in turn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from conftest import real_photo
from ls_standin import LabelStudioStandIn
from services import Postgres
from test_replicas import Replica

from sam_backend.commands.evaluate import CONFIG, LABEL
from sam_backend.labelstudio.context import keypoint_result
from sam_backend.segment.simulator import first_click
from sam_backend.sidecar.learning import LearningStore
from sam_backend.sidecar.store import open_sidecar

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    pytest.importorskip("psycopg")
    try:
        pg = Postgres(tmp_path_factory.mktemp("pg")).start()
    except (FileNotFoundError, OSError) as exc:  # PostgreSQL not installed: make test installs it
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL cannot be started here: {exc}")
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "sidecar.db")
    pg = request.getfixturevalue("postgres")
    import psycopg

    name = f"learn_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + "/" + name


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_two_processes_publishing_at_once_get_unique_version_numbers(database, tmp_path):
    """Two processes publish ten versions each of one project at the same time: twenty versions numbered 1..20, none
    twice (SQLite's writer lock; a PostgreSQL advisory lock around the allocation)."""
    LearningStore(open_sidecar(database), tmp_path)  # migrated once before the race
    code = f"""
        import sys
        from sam_backend.sidecar.learning import LearningStore
        from sam_backend.sidecar.store import open_sidecar
        store = LearningStore(open_sidecar({database!r}), {str(tmp_path)!r})
        for i in range(10):
            store.publish("3", "sam/vit_t/abc", b"v" * 1000, {{"by": sys.argv[1]}}, keep=100)
        """
    procs = [subprocess.Popen([*_script(code), name], cwd=ROOT) for name in ("a", "b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    store = LearningStore(open_sidecar(database), tmp_path)
    assert store.numbers("3", "sam/vit_t/abc") == list(range(1, 21))
    by = [store.version("3", "sam/vit_t/abc", n).info["by"] for n in range(1, 21)]
    assert sorted(set(by)) == ["a", "b"]
    store.publish("3", "sam/vit_t/abc", b"x", {}, keep=3)
    assert store.numbers("3", "sam/vit_t/abc") == [19, 20, 21]  # only the newest kept


def test_a_process_killed_while_writing_a_version_leaves_the_previous_one(database, tmp_path):
    """Version 1 is published; another process is killed with SIGKILL after writing version 2's row and before its
    transaction commits: version 1 is still the newest (whole), and the next version is numbered 2."""
    store = LearningStore(open_sidecar(database), tmp_path)
    store.publish("4", "w", b"first" * 100, {"n": 1}, keep=3)
    code = f"""
        import sys, time
        from sam_backend.sidecar.learning import LearningStore
        from sam_backend.sidecar.store import open_sidecar

        class Stalls(LearningStore):
            def _written(self, number):
                print("writing", number, flush=True)
                time.sleep(600)

        Stalls(open_sidecar({database!r}), {str(tmp_path)!r}).publish("4", "w", b"second" * 100, {{"n": 2}}, keep=3)
        """
    proc = subprocess.Popen(_script(code), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split() == ["writing", "2"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    again = LearningStore(open_sidecar(database), tmp_path)
    assert again.newest("4", "w") == 1
    kept = again.version("4", "w")
    assert kept.number == 1 and kept.data == b"first" * 100 and kept.info["n"] == 1
    assert again.publish("4", "w", b"third", {}, keep=3) == 2


def test_one_trainer_per_project_across_processes(database, tmp_path):
    """A process holding project 5's training lock keeps another from taking it; the lock dies with the process."""
    store = LearningStore(open_sidecar(database), tmp_path)
    code = f"""
        import time
        from sam_backend.sidecar.learning import LearningStore
        from sam_backend.sidecar.store import open_sidecar
        with LearningStore(open_sidecar({database!r}), {str(tmp_path)!r}).trainer("5") as mine:
            print("held" if mine else "refused", flush=True)
            time.sleep(600)
        """
    proc = subprocess.Popen(_script(code), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with store.trainer("5") as mine:
            assert not mine
        with store.trainer("6") as other:
            assert other  # another project is not held
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with store.trainer("5") as mine:
        assert mine
    with pytest.raises(ValueError, match="positive integer"), store.trainer("../x"):
        pass


def test_two_backends_on_one_postgres_keep_every_mask_and_serve_one_version(postgres, tmp_path,
                                                                            mobile_sam_checkpoint):
    """Two `sam-backend serve` processes (MobileSAM) on one PostgreSQL; twenty webhooks posted to them in turn, each
    confirmed with Label Studio (stood in): twenty masks kept, versions numbered once, and both processes answer the
    project's clicks with the same newest version."""
    import psycopg

    name = f"replicas_{os.getpid()}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    database = postgres.url.rsplit("/", 1)[0] + "/" + name
    image, mask = real_photo("GrabCut", 1)
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    ls = LabelStudioStandIn()
    env = {**os.environ, **ls.env(), "SAM_CHECKPOINT": str(mobile_sam_checkpoint), "SAM_ENCODER": "eager",
           "SAM_DECODER": "eager", "SAM_PRECISION": "fp32", "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
           "SAM_METADATA_DB": database, "SAM_ADAPT": "true", "SAM_ADAPT_STEPS": "80", "SAM_ADAPT_EVERY": "10",
           "SAM_ADAPTER_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(ROOT)}
    replicas = [Replica(env).start(), Replica(env).start()]
    try:
        for r in replicas:
            r.wait_ready()
        for n in range(1, 21):
            resp = requests.post(replicas[n % 2].url + "/webhook", json=ls.annotate(11, n, "photo.png", mask),
                                 timeout=30)
            assert resp.status_code == 200 and resp.json()["kept"] == 1, resp.text
        store = LearningStore(open_sidecar(database), tmp_path / "locks")
        assert [r.annotation_id for r in store.masks("11")] == list(range(1, 21))
        x, y, _ = first_click(mask)
        body = {"tasks": [{"id": 99, "data": {"image": "photo.png"}}], "label_config": CONFIG, "project": "11.1",
                "params": {"context": {"result": [keypoint_result(x, y, mask.shape[::-1], True, LABEL)]}}}
        deadline = time.monotonic() + 900
        while True:  # trainings run at 5 and 15 masks, on whichever replica has the project's lock
            health = [requests.get(r.url + "/health", timeout=10).json()["adapt"]["projects"].get("11", {})
                      for r in replicas]
            newest = store.newest("11", store_weights(store))
            idle = all(h.get("state") == "idle" for h in health)
            if idle and newest is not None and store.training("11", store_weights(store)).attempted_at >= 15:
                break
            assert time.monotonic() < deadline, health
            time.sleep(1.0)
        numbers = store.numbers("11", store_weights(store))
        assert numbers == list(range(1, len(numbers) + 1))  # allocated once each, none skipped or doubled
        versions = set()
        for r in replicas:
            for _ in range(60):
                answer = requests.post(r.url + "/predict", json=body, timeout=60).json()
                if answer["model_version"].endswith(f"-adapted-p11-v{numbers[-1]}"):
                    break
                time.sleep(0.5)
            versions.add(answer["model_version"])
        assert len(versions) == 1 and next(iter(versions)).endswith(f"-v{numbers[-1]}")
    finally:
        for r in replicas:
            r.stop()
        ls.stop()


def store_weights(store: LearningStore) -> str:
    """The weights key project 11's trainings are stored under (the engine id without its precision), or ""."""
    rows = store.db.query("SELECT DISTINCT weights FROM adapter_trainings WHERE project = '11'")
    return rows[0][0] if rows else ""


def test_masks_survive_in_order_and_an_update_replaces_its_annotation(database, tmp_path):
    """Rows are keyed by annotation and region: an update replaces its annotation's rows only; arrival order holds."""
    from sam_backend.labelstudio.accepted import MaskRecord
    from sam_backend.segment.masks import mask_to_rle

    store = LearningStore(open_sidecar(database), tmp_path)
    rle = mask_to_rle(np.eye(4, dtype=bool))["counts"]

    def rec(annotation: int, region: str) -> MaskRecord:
        return MaskRecord("8", annotation, region, annotation, "a.png", "Object", 4, 4, rle)

    for a in (1, 2, 3):
        store.replace_annotation(a, [rec(a, "r")])
    assert store.replace_annotation(2, [rec(2, "x"), rec(2, "y")]) == 1
    assert [r.key for r in store.masks("8")] == ["1/r", "3/r", "2/x", "2/y"]
    assert np.array_equal(store.masks("8")[0].mask(), np.eye(4, dtype=bool))
    assert store.replace_annotation(3, []) == 1 and store.mask_count("8") == 3


def test_clicks_and_health_go_on_while_the_database_is_down(tmp_path, mobile_sam_checkpoint):
    """A project's version is served from PostgreSQL; PostgreSQL is stopped: the project's clicks are still answered
    with the version already built, /health answers at once and says the database cannot be read, webhooks are
    answered 200 without learning; PostgreSQL back: learning goes on."""
    import psycopg

    from sam_backend.config import Settings
    from sam_backend.segment.adapt import TRAINABLE, adapted_decoder, pack_version
    from sam_backend.segment.engines.factory import make_engine
    from sam_backend.serving.adapt_versions import weights_of
    from sam_backend.serving.app import create_app

    pg = Postgres(tmp_path / "pg").start()
    ls = LabelStudioStandIn()
    try:
        image, mask = real_photo("GrabCut", 1)
        cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        settings = Settings.from_env({**ls.env(), "SAM_CHECKPOINT": str(mobile_sam_checkpoint), "SAM_ENCODER": "eager",
                                      "SAM_DECODER": "eager", "SAM_PRECISION": "fp32", "SAM_ADAPT": "true",
                                      "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_METADATA_DB": pg.url,
                                      "SAM_ADAPTER_DIR": str(tmp_path / "locks")})
        engine = make_engine(settings)  # as the app loads it: the version names these weights
        state = {n: p.detach() for n, p in adapted_decoder(engine).named_parameters() if n.startswith(TRAINABLE)}
        store = LearningStore(open_sidecar(pg.url), tmp_path / "locks")
        store.publish("12", weights_of(engine), pack_version(state, {"weights": weights_of(engine)}),
                      {"trained_on": 4}, keep=3)
        client = create_app(settings).test_client()
        x, y, _ = first_click(mask)
        body = {"tasks": [{"id": 99, "data": {"image": "photo.png"}}], "label_config": CONFIG, "project": "12.1",
                "params": {"context": {"result": [keypoint_result(x, y, mask.shape[::-1], True, LABEL)]}}}
        assert client.post("/predict", json=body).json["model_version"].endswith("-adapted-p12-v1")
        pg.stop()
        time.sleep(2.5)  # past the version poll's interval: the next click asks the database, which is down
        for _ in range(3):
            answer = client.post("/predict", json=body)
            assert answer.status_code == 200 and answer.json["model_version"].endswith("-adapted-p12-v1")
        health = client.get("/health")
        assert health.status_code == 200 and "cannot be read" in health.json["adapt"]["error"]
        resp = client.post("/webhook", json=ls.annotate(12, 1, "photo.png", mask))
        assert resp.status_code == 200 and resp.json["kept"] == 0
        assert any("sidecar database refused" in s for s in resp.json["skipped"])
        pg.start()
        client.application.extensions["sam_backend"].adapters.versions._down_until = 0.0  # as after DOWN_S
        assert client.post("/webhook", json=ls.annotate(12, 2, "photo.png", mask)).json["kept"] == 1
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT COUNT(*) FROM accepted_masks").fetchone()[0] == 1
    finally:
        pg.stop()
        ls.stop()
