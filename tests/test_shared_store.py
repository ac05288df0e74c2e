"""The shared tiers: embeddings and object memories in a directory or in a real Redis, the sidecar in a real
PostgreSQL; outages of both while clicks go on. Every service runs on 127.0.0.1 (see tests/services.py)."""

from __future__ import annotations

import logging
import threading
import time

import cv2
import numpy as np
import pytest
from conftest import load_request
from services import Postgres, Redis
from synthetic import disc_scene

from sam_backend.config import Settings
from sam_backend.segment.samples import bench_prompts
from sam_backend.serving.backend import SamBackend
from sam_backend.serving.stores import DirectoryStore, RedisStore, open_store
from sam_backend.sidecar.records import Interaction
from sam_backend.sidecar.store import SCHEMA_VERSION, AsyncRecorder, Store


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# -- compact embeddings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_compact_embeddings_give_the_same_masks(family, tiny_engine, tiny_sam2_engine):
    """float16 features (half the bytes) give masks IoU ≥ 0.99 with the fresh float32 ones, for every prompt."""
    engine = tiny_engine if family == "sam" else tiny_sam2_engine
    image, _, _ = disc_scene()
    fresh = engine.embed(image)
    data = engine.dump(fresh, compact=True)
    assert len(data) < 0.55 * len(engine.dump(fresh))
    stored = engine.load(data)
    assert all(v.dtype == fresh.features[k].dtype for k, v in stored.features.items())
    for prompt in bench_prompts(image.shape[1], image.shape[0]):
        a, b = engine.predict(fresh, prompt), engine.predict(stored, prompt)
        assert iou(a.best_mask, b.best_mask) >= 0.99


# -- the directory tier -------------------------------------------------------------------------------------

def test_directory_store_is_atomic_lru_bounded_and_locks_expire(tmp_path):
    store = DirectoryStore(tmp_path / "tier", max_bytes=3000)
    for i in range(3):
        store.put(f"k{i}", bytes([i]) * 1000)
        time.sleep(0.01)
    assert store.get("k0") == b"\x00" * 1000  # k0 used: k1 is now the least recently used
    time.sleep(0.01)
    store.put("k3", b"\x03" * 1000)
    assert store.get("k1") is None and store.get("k0") is not None and store.get("k3") is not None
    assert not list((tmp_path / "tier").glob("*.tmp")) and not list((tmp_path / "tier").glob(".*"))
    assert store.claim("k9") and not store.claim("k9")
    store.release("k9")
    assert store.claim("k9")
    assert store.claim("k9", ttl_s=0.0)  # a lock older than its time limit: its owner died
    with pytest.raises(Exception, match="SAM_EMBEDDING_STORE"):
        open_store("ftp://example/x", 1)


def scene_files(tmp_path, n=1):
    urls = []
    for i in range(n):
        image, _, _ = disc_scene(seed=i)
        cv2.imwrite(str(tmp_path / f"img{i}.png"), image[:, :, ::-1])
        urls.append(f"/data/local-files/?d=img{i}.png")
    return urls


def click_body(url: str, x: float = 50.0, y: float = 55.0, extra: list | None = None) -> dict:
    body = load_request("predict.context-keypointlabels")
    body["tasks"][0]["data"]["image"] = url
    first = body["params"]["context"]["result"][0]
    first["original_width"], first["original_height"] = 320, 240
    first["value"]["x"], first["value"]["y"] = x, y
    for point in extra or []:
        more = {**first, "id": f"k{point[0]}", "value": {**first["value"], "x": point[0], "y": point[1]}}
        body["params"]["context"]["result"].append(more)
    return body


def brush(answer: dict) -> np.ndarray:
    from sam_backend.labelstudio.brush import decode_brush

    result = answer["results"][0]["result"][0]
    return decode_brush(result["value"]["rle"], result["original_width"], result["original_height"])


def make_backend(tmp_path, engine, store_url, **env):
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_EMBEDDING_STORE": store_url,
                                  "SAM_METADATA_DB": str(tmp_path / "s.db"), **env})
    return SamBackend(settings, engine_factory=lambda: engine, recorder=lambda _: None)


def metric(backend: SamBackend, name: str) -> float:
    total = 0.0
    for line in backend.metrics.render().decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def encodes(backend: SamBackend) -> int:
    return int(metric(backend, "sam_encoder_seconds_count"))


def test_directory_tier_survives_a_restart_and_replaces_a_corrupted_file(tmp_path, tiny_engine):
    [url] = scene_files(tmp_path)
    store_url = f"file://{tmp_path / 'tier'}"
    first = make_backend(tmp_path, tiny_engine, store_url)
    answer = first.predict(click_body(url))
    assert encodes(first) == 1 and answer["results"][0]["result"]
    files = list((tmp_path / "tier").glob("*.bin"))
    assert len(files) == 3  # the embedding, the URL's digest, the object's logits

    restarted = make_backend(tmp_path, tiny_engine, store_url)  # a new process: empty in-process cache
    again = restarted.predict(click_body(url))
    assert encodes(restarted) == 0 and metric(restarted, 'sam_store_total{result="hit"}') == 1
    assert iou(brush(again), brush(answer)) >= 0.99  # from the float16 features stored

    emb_file = max(files, key=lambda p: p.stat().st_size)
    emb_file.write_bytes(emb_file.read_bytes()[:-100] + b"\x00" * 100)  # torn: the crc32 no longer matches
    third = make_backend(tmp_path, tiny_engine, store_url)
    assert third.predict(click_body(url))["results"][0]["result"]
    assert encodes(third) == 1 and metric(third, 'sam_store_total{result="refused"}') == 1
    assert tiny_engine.load(emb_file.read_bytes()).engine_id == tiny_engine.engine_id  # replaced by a good one


# -- Redis ----------------------------------------------------------------------------------------------------

@pytest.fixture()
def redis(tmp_path):
    server = Redis(tmp_path / "redis").start()
    yield server
    server.stop()


def test_two_workers_share_embeddings_url_digests_and_object_memory(tmp_path, tiny_engine, redis):
    [url] = scene_files(tmp_path)
    a = make_backend(tmp_path, tiny_engine, redis.url)
    b = make_backend(tmp_path, tiny_engine, redis.url)
    a.predict(click_body(url))
    fetched = []
    b.fetcher.load = lambda u: fetched.append(u)  # B must not need the image: digest and embedding are shared
    second = b.predict(click_body(url, extra=[(60.0, 50.0)]))
    assert second["results"][0]["result"] and not fetched
    assert encodes(a) == 1 and encodes(b) == 0
    # The second click (one more point on the same object) was seeded with A's first answer.
    engine_id, image_id = tiny_engine.engine_id, next(iter(a.cache._data))[1]
    from sam_backend.labelstudio.context import parse_context

    prompts = parse_context(click_body(url, extra=[(60.0, 50.0)])["params"]["context"],
                            image_size=(320, 240))
    seeded = b.memory.objects.previous(engine_id, image_id, prompts[0])
    mine = a.memory.objects.previous(engine_id, image_id, prompts[0])
    assert seeded is not None and mine is not None and np.array_equal(seeded, mine)


def test_one_encode_per_image_across_workers_that_click_at_once(tmp_path, tiny_engine, redis):
    urls = scene_files(tmp_path, 3)
    slow = SlowerEncode(tiny_engine, 0.5)
    workers = [make_backend(tmp_path, slow, redis.url) for _ in range(4)]
    errors: list[BaseException] = []

    def annotate(backend, url):
        try:
            assert backend.predict(click_body(url))["results"][0]["result"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=annotate, args=(w, u)) for u in urls for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(encodes(w) for w in workers) == len(urls)
    assert sum(metric(w, 'sam_store_total{result="waited"}') for w in workers) >= 1


class SlowerEncode:
    """The tiny SAM with its encode made 0.5 s longer (a large model's encode, so that workers overlap)."""

    def __init__(self, engine, delay_s: float) -> None:
        self.engine, self.delay_s = engine, delay_s

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def embed(self, image):
        time.sleep(self.delay_s)
        return self.engine.embed(image)


def test_a_crashed_workers_lock_expires(redis):
    store = RedisStore(redis.url)
    assert store.claim("emb:x", ttl_s=0.3) and not RedisStore(redis.url).claim("emb:x")
    time.sleep(0.4)
    assert RedisStore(redis.url).claim("emb:x")  # the first owner never released it


def test_clicks_go_on_while_redis_is_down_and_sharing_resumes(tmp_path, tiny_engine, redis, caplog):
    urls = scene_files(tmp_path, 3)
    a = make_backend(tmp_path, tiny_engine, redis.url)
    b = make_backend(tmp_path, tiny_engine, redis.url)
    a.predict(click_body(urls[0]))
    redis.stop()
    with caplog.at_level(logging.WARNING):
        assert a.predict(click_body(urls[0]))["results"][0]["result"]  # its own cache
        assert a.predict(click_body(urls[1]))["results"][0]["result"]  # encoded here, not shared
    assert "embedding store (redis) unavailable" in caplog.text
    assert metric(a, "sam_store_up") == 0 and metric(a, "sam_store_errors") > 0
    from sam_backend.serving.app import create_app

    health = create_app(a.settings, backend=a, start=False).test_client().get("/health").get_json()
    assert health["store"] == {"kind": "redis", "up": False}
    redis.start()  # same port, empty
    a.predict(click_body(urls[2]))
    b.predict(click_body(urls[2]))
    assert encodes(b) == 0 and metric(a, "sam_store_up") == 1


# -- PostgreSQL -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    server = Postgres(tmp_path_factory.mktemp("pg")).start()
    yield server
    server.stop()


def interaction(i: int, key: str | None = None) -> Interaction:
    mask = np.zeros((40, 60), bool)
    mask[5:20 + i % 10, 10:30] = True
    return Interaction(image_id=f"{i % 3:064x}", prompt={"points": [[12.0 + i, 9.0]], "labels": [1], "box": None},
                       mask=mask, project="7", task_id=100 + i % 4, image_url="/data/x.png", engine="sam/t/fp32",
                       model_version="v", label="Object", score=0.5 + i / 100, latency_ms=3.0, cache_hit=i % 2 == 0,
                       created_at=f"2026-11-27T10:00:{i:02d}.000+00:00", request_key=key)


def test_postgres_sidecar_keeps_what_sqlite_keeps(tmp_path, postgres):
    import psycopg

    from sam_backend.sidecar.store import open_sidecar

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS interactions, sam_schema_version, accepted_masks, adapter_versions, "
                     "adapter_trainings")
    pg = open_sidecar(postgres.url)
    lite = Store(tmp_path / "s.db")
    for i in range(12):
        for store in (pg, lite):
            store.record(interaction(i, key=f"req{i}:0:0"))
    assert pg.record(interaction(3, key="req3:0:0")) is None  # a retried request: kept once
    assert pg.count() == lite.count() == 12
    for query in ({}, {"task": 101}, {"project": "7", "since": "2026-11-27T10:00:05"}, {"limit": 3}):
        strip = [{k: v for k, v in r.items() if k != "id"} for r in pg.history(**query)]
        assert strip == [{k: v for k, v in r.items() if k != "id"} for r in lite.history(**query)], query
    assert open_sidecar(postgres.url).migrate() == SCHEMA_VERSION  # a second replica starting: nothing to do


def test_rows_wait_while_postgres_is_down_and_none_is_lost(tmp_path_factory, caplog):
    server = Postgres(tmp_path_factory.mktemp("pgdown")).start()
    try:
        from sam_backend.sidecar.store import open_sidecar

        recorder = AsyncRecorder(open_sidecar(server.url), confirm_s=0.5, retry_max_s=0.5)
        lost: list[str] = []
        recorder.on_lost = lost.append
        for i in range(5):
            recorder(interaction(i, key=f"a{i}"))
        server.stop()
        with caplog.at_level(logging.WARNING):
            t0 = time.monotonic()
            for i in range(5, 25):
                recorder(interaction(i, key=f"a{i}"))  # the database is down: the click does not wait
            assert time.monotonic() - t0 < 5
            time.sleep(1.0)
        assert "sidecar database unavailable" in caplog.text and recorder.pending > 0
        server.start()
        assert recorder.flush(60)
        assert open_sidecar(server.url).count() == 25 and not lost
    finally:
        server.stop()


def test_postgres_down_at_start_then_up(tmp_path_factory, caplog):
    """A replica that starts while PostgreSQL is not up yet: it starts, rows wait, and the first write that
    reaches the database creates the schema and writes them all."""
    from sam_backend.sidecar.store import open_sidecar

    server = Postgres(tmp_path_factory.mktemp("pglate"))
    with caplog.at_level(logging.WARNING):
        store = open_sidecar(server.url)  # nothing listens on that port yet
    assert "not reachable at start" in caplog.text
    recorder = AsyncRecorder(store, confirm_s=0.2, retry_max_s=0.5)
    for i in range(3):
        recorder(interaction(i, key=f"late{i}"))
    try:
        server.start()
        assert recorder.flush(60)
        assert open_sidecar(server.url).count() == 3
    finally:
        server.stop()
