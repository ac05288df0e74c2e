"""The Label Studio protocol through Flask's test client, with real engines and images read from disk."""

from __future__ import annotations

import base64
import json
import threading

import cv2
import numpy as np
import pytest
from conftest import ROOT, load_request
from label_studio_sdk.converter.brush import decode_rle
from synthetic import iou, textured_background

from sam_backend.config import Settings
from sam_backend.segment.engines import EngineError
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend
from sam_backend.sidecar.store import AsyncRecorder, Store

W, H = 640, 480
CLICK = load_request("predict.browser-1-click")
CLICK_PX = (CLICK["params"]["context"]["result"][0]["value"]["x"] / 100 * W,
            CLICK["params"]["context"]["result"][0]["value"]["y"] / 100 * H)


def disc_image(center, radius=70, seed=0):
    image = textured_background(H, W, seed)
    mask = np.zeros((H, W), np.uint8)
    cv2.circle(mask, (int(center[0]), int(center[1])), radius, 1, -1)
    image[mask > 0] = (230, 120, 30)
    return image, mask.astype(bool)


@pytest.fixture()
def scene(tmp_path):
    image, mask = disc_image(CLICK_PX)
    cv2.imwrite(str(tmp_path / "disc.png"), image[:, :, ::-1])
    return tmp_path, mask


def make(tmp_path, engine_factory=GrabCutEngine, env=None, start=True):
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_ENGINE": "grabcut",
                                  "SAM_METADATA_DB": str(tmp_path / "sidecar.db"), **(env or {})})
    recorder = AsyncRecorder(Store(settings.metadata_db))
    backend = SamBackend(settings, engine_factory=engine_factory, recorder=recorder)
    app = create_app(settings, backend=backend, start=start)
    return app.test_client(), backend, recorder


def body_for(request_name, image="/data/local-files/?d=disc.png"):
    body = load_request(request_name)
    for task in body["tasks"]:
        task["data"]["image"] = image
    return body


def decode_brush(result):
    rgba = decode_rle(result["value"]["rle"]).reshape(result["original_height"], result["original_width"], 4)
    return rgba[:, :, 3] > 0


def test_health_and_root(scene):
    client, backend, _ = make(scene[0])
    for path in ("/", "/health"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.json["status"] == "UP"
        assert resp.json["model_version"] == backend.model_version


def test_setup_parses_config_without_loading_the_model(scene):
    calls = []
    client, backend, _ = make(scene[0], engine_factory=lambda: calls.append(1) or GrabCutEngine(), start=False)
    resp = client.post("/setup", json=load_request("setup"))
    assert resp.status_code == 200 and resp.json == {"model_version": backend.model_version}
    assert calls == [] and backend.fetcher.setup_hostname == "http://127.0.0.1:8080"


def test_setup_without_mask_control_is_refused(scene):
    client, _, _ = make(scene[0])
    body = dict(load_request("setup"), schema='<View><Image name="i" value="$image"/></View>')
    resp = client.post("/setup", json=body)
    assert resp.status_code == 400 and "BrushLabels" in resp.json["errors"][0]


def test_task_opened_answers_empty_and_precomputes(scene):
    gate = threading.Event()

    class GatedEngine(GrabCutEngine):
        def embed(self, image):
            gate.wait(30)  # the encode cannot finish before the test lets it
            return super().embed(image)

    client, backend, _ = make(scene[0], engine_factory=GatedEngine)
    resp = client.post("/predict", json=body_for("predict.task-opened"))
    # The answer came back while the encode was still held: it never waits for the model.
    assert resp.status_code == 200 and resp.json["results"] == []
    assert backend.cache.stats().entries == 0
    gate.set()
    assert backend.prewarm.wait(30)
    assert backend.cache.stats().entries == 1 and backend.cache.stats().misses == 1
    resp = client.post("/predict", json=body_for("predict.browser-1-click"))
    assert resp.status_code == 200
    s = backend.cache.stats()
    assert (s.misses, s.hits) == (1, 1)  # the click found the embedding computed in the background


def test_click_returns_brush_covering_the_object(scene):
    tmp_path, truth = scene
    client, backend, recorder = make(tmp_path)
    resp = client.post("/predict", json=body_for("predict.browser-1-click"))
    assert resp.status_code == 200, resp.json
    [entry] = resp.json["results"]
    [result] = entry["result"]
    assert result["type"] == "brushlabels" and result["from_name"] == "tag" and result["to_name"] == "image"
    assert result["value"]["brushlabels"] == ["Object"] and result["value"]["format"] == "rle"
    assert (result["original_width"], result["original_height"]) == (W, H)
    assert iou(decode_brush(result), truth) >= 0.8
    recorder.flush()
    [row] = Store(tmp_path / "sidecar.db").history(task=3)
    assert row["project"] == "3" and row["image_url"] == "/data/local-files/" and row["label"] == "Object"
    assert row["click_x"] == pytest.approx(CLICK_PX[0], abs=0.01) and row["coco_annotation"]["area"] > 0


def test_rectangle_and_negative_clicks(scene):
    tmp_path, truth = scene
    client, _, _ = make(tmp_path)
    body = body_for("predict.browser-4-smart-rectangle")
    cx, cy = CLICK_PX
    body["params"]["context"]["result"][0]["value"].update(
        x=(cx - 80) / W * 100, y=(cy - 80) / H * 100, width=160 / W * 100, height=160 / H * 100)
    resp = client.post("/predict", json=body)
    [result] = resp.json["results"][0]["result"]
    assert iou(decode_brush(result), truth) >= 0.85
    # Two positive clicks on the disc cover the point where the Alt-click (negative) lands next...
    negative = body_for("predict.browser-3-alt-click-negative")
    nx, ny = next((r["value"]["x"] / 100 * W, r["value"]["y"] / 100 * H)
                  for r in negative["params"]["context"]["result"] if not r["is_positive"])
    resp = client.post("/predict", json=body_for("predict.browser-2-second-click"))
    [before] = resp.json["results"][0]["result"]
    assert decode_brush(before)[int(ny), int(nx)]
    # ...and the negative click takes that point out while the positive clicks stay in.
    resp = client.post("/predict", json=negative)
    assert resp.status_code == 200
    [after] = resp.json["results"][0]["result"]
    mask = decode_brush(after)
    assert not mask[int(ny), int(nx)] and mask[int(CLICK_PX[1]), int(CLICK_PX[0])]
    assert mask.sum() < decode_brush(before).sum()


def test_second_click_reuses_the_first_clicks_logits(scene, tiny_checkpoint):
    from sam_backend.segment.engines.sam import SamEngine

    client, backend, _ = make(scene[0], engine_factory=lambda: SamEngine.from_checkpoint(tiny_checkpoint, device="cpu"))
    assert client.post("/predict", json=body_for("predict.browser-1-click")).status_code == 200
    assert backend.memory.objects.stats().entries == 1
    resp = client.post("/predict", json=body_for("predict.browser-2-second-click"))
    assert resp.status_code == 200 and len(resp.json["results"][0]["result"]) <= 1
    assert backend.memory.objects.stats().hits == 1 and backend.memory.objects.stats().entries == 2


def test_polygon_config_gives_polygon(scene):
    tmp_path, truth = scene
    client, _, _ = make(tmp_path)
    body = body_for("predict.browser-1-click")
    body["label_config"] = (ROOT / "label_config" / "points-and-boxes-polygon.xml").read_text()
    body["params"]["context"]["result"][0]["from_name"] = "kp"
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.json
    [result] = resp.json["results"][0]["result"]
    assert result["type"] == "polygonlabels"
    pts = np.array(result["value"]["points"]) / 100 * [W, H]
    poly = np.zeros((H, W), np.uint8)
    cv2.fillPoly(poly, [np.round(pts).astype(np.int32)], 1)
    assert iou(poly.astype(bool), truth) >= 0.8


@pytest.mark.parametrize(("kwargs", "status", "needle"), [
    ({"data": b"not json", "content_type": "text/plain"}, 400, "expected a JSON object"),
    ({"json": {"tasks": "x", "label_config": "<View/>"}}, 400, "tasks: expected a list"),
    ({"json": {"tasks": [{"id": 1, "data": {}}], "label_config": "<View"}}, 400, "label_config"),
])
def test_bad_requests(scene, kwargs, status, needle):
    client, _, _ = make(scene[0])
    resp = client.post("/predict", **kwargs)
    assert resp.status_code == status and needle in resp.json["errors"][0]


def test_bad_prompt_is_422_naming_the_field(scene):
    client, _, _ = make(scene[0])
    body = body_for("predict.browser-1-click")
    body["params"]["context"]["result"][0]["value"]["x"] = 250
    resp = client.post("/predict", json=body)
    assert resp.status_code == 422 and "value.x" in resp.json["errors"][0]


def test_missing_image_and_traversal(scene):
    client, _, _ = make(scene[0])
    resp = client.post("/predict", json=body_for("predict.browser-1-click", image="/data/local-files/?d=nope.png"))
    assert resp.status_code == 404 and "does not exist" in resp.json["errors"][0]
    resp = client.post("/predict", json=body_for("predict.browser-1-click",
                                                 image="/data/local-files/?d=../../etc/passwd"))
    assert resp.status_code == 403 and "outside" in resp.json["errors"][0]


def test_missing_checkpoint_is_503_naming_the_command(scene, tmp_path):
    from sam_backend.segment.engines.sam import SamEngine

    client, _, _ = make(scene[0], engine_factory=lambda: SamEngine.from_checkpoint(tmp_path / "none.pth",
                                                                                    model_type="vit_b"))
    resp = client.post("/predict", json=body_for("predict.browser-1-click"))
    assert resp.status_code == 503 and "sam-backend download vit_b" in resp.json["errors"][0]
    assert "sam-backend download" in client.get("/health").json["engine_error"]


def test_engine_exception_fails_one_request_without_traceback(scene):
    class Flaky(GrabCutEngine):
        fail = True

        def predict(self, *args, **kwargs):
            if Flaky.fail:
                Flaky.fail = False
                raise ZeroDivisionError("secret internals")
            return super().predict(*args, **kwargs)

    client, _, _ = make(scene[0], engine_factory=Flaky)
    resp = client.post("/predict", json=body_for("predict.browser-1-click"))
    assert resp.status_code == 500 and "internal error" in resp.json["errors"][0]
    assert "Traceback" not in resp.get_data(as_text=True) and "secret internals" not in resp.get_data(as_text=True)
    assert client.post("/predict", json=body_for("predict.browser-1-click")).status_code == 200


def test_engine_error_class_maps_to_503(scene):
    def broken():
        raise EngineError("no GPU today")

    client, _, _ = make(scene[0], engine_factory=broken)
    assert client.post("/predict", json=body_for("predict.browser-1-click")).status_code == 503


def test_basic_auth(scene):
    """With BASIC_AUTH set every endpoint needs the credentials, except that a health check without any (a load
    balancer's, Docker's) learns whether the backend is up and whether learning is on, and nothing more."""
    client, _, _ = make(scene[0], env={"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret"})
    short = client.get("/health")
    assert short.status_code == 200 and set(short.json) == {"status", "model_class", "model", "engine_ready", "adapt"}
    assert short.json["adapt"] == {"enabled": False}
    assert client.post("/predict", json=body_for("predict.browser-1-click")).status_code == 401
    assert client.get("/metrics").status_code == 401 and client.get("/versions").status_code == 401
    bad = base64.b64encode(b"ann:wrong").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"ann:s3cret").decode()
    full = client.get("/health", headers={"Authorization": f"Basic {good}"})
    assert full.status_code == 200 and "engine_error" in full.json and "cache_entries" in full.json


def test_webhook_versions_metrics(scene):
    client, backend, _ = make(scene[0])
    for name in ("webhook.ANNOTATION_CREATED", "webhook.START_TRAINING"):
        assert client.post("/webhook", json=load_request(name)).status_code == 200
    assert client.get("/versions").json["versions"] == [backend.model_version]
    client.post("/predict", json=body_for("predict.browser-1-click"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'sam_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert "sam_cache_misses_total 1.0" in text and "sam_decoder_seconds_count 1.0" in text


# -- paths that only GrabCut exercised, now with the tiny SAM; failure paths ----------------------------

POLYGON_CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="poly" toName="image"><Label value="Object"/></PolygonLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""


def tiny_sam(tiny_checkpoint):
    from sam_backend.segment.engines.sam import SamEngine

    return lambda: SamEngine.from_checkpoint(tiny_checkpoint, device="cpu")


def metric(backend, name: str) -> float:
    """The metric's value, summed over its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in backend.metrics.render().decode().splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_tiny_sam_polygon_output(scene, tiny_checkpoint):
    from sam_backend.segment.refine import refine

    client, backend, _ = make(scene[0], engine_factory=tiny_sam(tiny_checkpoint))
    body = body_for("predict.browser-1-click")
    body["label_config"] = POLYGON_CONFIG
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.json
    [region] = resp.json["results"][0]["result"]
    assert region["type"] == "polygonlabels" and region["from_name"] == "poly"
    assert region["value"]["closed"] is True and region["value"]["polygonlabels"] == ["Object"]
    # The outline is the refined mask the model gave (largest component), drawn back within a pixel or so.
    embedding, prompt = _embedding_and_prompt(backend, body)
    direct = backend.engine.get().predict(embedding, prompt)
    refined = refine(direct.masks[direct.best], prompt, backend.settings.refine)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(refined.astype(np.uint8), connectivity=8)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(largest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = cv2.drawContours(np.zeros((H, W), np.uint8), contours, -1, 1, -1).astype(bool)  # holes filled
    pts = np.array(region["value"]["points"]) / 100 * [W, H]
    drawn = np.zeros((H, W), np.uint8)
    cv2.fillPoly(drawn, [np.round(pts).astype(np.int32)], 1)
    assert iou(drawn.astype(bool), outline) >= 0.9


def _embedding_and_prompt(backend, body):
    from sam_backend.labelstudio.context import parse_context

    _, embedding, _ = backend.embedding(body["tasks"][0]["data"]["image"], backend.engine.get())
    [prompt] = parse_context(body["params"]["context"], image_size=embedding.image_size)
    return embedding, prompt


def test_tiny_sam_negative_click_reaches_the_model_with_the_previous_logits(scene, tiny_checkpoint):
    engine = tiny_sam(tiny_checkpoint)()
    calls = []
    real_predict = engine.predict

    def predict(embedding, prompt, prev_logits=None):
        out = real_predict(embedding, prompt, prev_logits=prev_logits)
        calls.append((prompt.labels.tolist(), prev_logits, out.low_res_logits[out.best]))
        return out

    engine.predict = predict
    client, backend, _ = make(scene[0], engine_factory=lambda: engine)
    assert client.post("/predict", json=body_for("predict.browser-2-second-click")).status_code == 200
    assert client.post("/predict", json=body_for("predict.browser-3-alt-click-negative")).status_code == 200
    (two, _, two_logits), (three, prev, _) = calls
    assert two == [1, 1] and three == [1, 1, 0]  # the Alt-click is a negative third point
    assert prev is not None and np.array_equal(prev, two_logits)  # seeded with the two-click answer
    assert backend.memory.objects.stats().hits == 1


def test_tiny_sam_precompute_then_a_hit(scene, tiny_checkpoint):
    client, backend, _ = make(scene[0], engine_factory=tiny_sam(tiny_checkpoint))
    assert client.post("/predict", json=body_for("predict.task-opened")).json["results"] == []
    assert backend.prewarm.wait(60) and backend.cache.stats().misses == 1
    assert client.post("/predict", json=body_for("predict.browser-1-click")).status_code == 200
    s = backend.cache.stats()
    assert (s.misses, s.hits) == (1, 1)


def test_tiny_sam_concurrent_clicks_on_one_new_image_encode_once(scene, tiny_checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    client, backend, _ = make(scene[0], engine_factory=tiny_sam(tiny_checkpoint), start=False)
    backend.engine.get()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: client.post("/predict", json=body_for("predict.browser-1-click")).status_code,
                              range(8)))
    s = backend.cache.stats()
    assert codes == [200] * 8 and s.misses == 1 and s.coalesced + s.hits == 7 and s.coalesced > 0


def test_negative_only_prompt_over_http_is_a_clear_422(scene):
    client, _, _ = make(scene[0])
    body = body_for("predict.browser-1-click")
    body["params"]["context"]["result"][0]["is_positive"] = False
    resp = client.post("/predict", json=body)
    assert resp.status_code == 422
    assert resp.json["errors"] == ["prompt: object 'Object' has only negative points (1); add a positive point or "
                                   "a box"]


def test_a_locked_sidecar_database_keeps_the_click_and_the_row_waits(scene, caplog):
    """Another process holds the database: the click is answered, its row waits in the buffer (nothing lost)
    and is written once the database is free."""
    import sqlite3

    tmp_path, _ = scene
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    recorder = AsyncRecorder(Store(settings.metadata_db, busy_timeout_ms=50), confirm_s=0.25, retry_max_s=0.2)
    backend = SamBackend(settings, engine_factory=GrabCutEngine, recorder=recorder)
    client = create_app(settings, backend=backend).test_client()
    holder = sqlite3.connect(settings.metadata_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # every write times out while this is held
    try:
        resp = client.post("/predict", json=body_for("predict.browser-1-click"))
        assert resp.status_code == 200 and len(resp.json["results"][0]["result"]) == 1
        assert not recorder.flush(timeout_s=1.0) and recorder.down  # the row is still waiting
        assert metric(backend, "sam_sidecar_lost_total") == 0
        assert any("sidecar database unavailable" in r.getMessage() for r in caplog.records)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    client.post("/predict", json=body_for("predict.browser-1-click"))
    assert recorder.flush(timeout_s=30)
    assert Store(settings.metadata_db).count() == 2 and not recorder.down  # the waiting row, then the new one


def test_a_row_that_cannot_be_written_is_counted_and_logged(tmp_path, caplog):
    from sam_backend.sidecar.records import Interaction

    recorder = AsyncRecorder(Store(tmp_path / "s.db"))
    lost: list[str] = []
    recorder.on_lost = lost.append
    recorder(Interaction(image_id=None, prompt={"points": [[1.0, 2.0]]}))  # NOT NULL image_id: refused for good
    assert recorder.flush(10)
    assert lost == ["write_failed"] and any("sidecar write failed" in r.getMessage() for r in caplog.records)


def test_a_full_sidecar_queue_keeps_the_clicks_and_counts_the_loss(scene, caplog):
    import sqlite3

    tmp_path, _ = scene
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    recorder = AsyncRecorder(Store(settings.metadata_db, busy_timeout_ms=60_000), max_pending=1)
    backend = SamBackend(settings, engine_factory=GrabCutEngine, recorder=recorder)
    client = create_app(settings, backend=backend).test_client()
    holder = sqlite3.connect(settings.metadata_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the writer blocks on its first row; the queue (1) fills up
    try:
        codes = [client.post("/predict", json=body_for("predict.browser-1-click")).status_code for _ in range(5)]
        assert codes == [200] * 5
        lost = metric(backend, "sam_sidecar_lost_total")  # the writer waits on the lock, the queue (1) is full
        assert lost >= 1 and 'reason="queue_full"' in backend.metrics.render().decode()
        assert any("sidecar buffer full" in r.getMessage() for r in caplog.records)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    recorder.flush(timeout_s=60)
    assert Store(settings.metadata_db).count() == 5 - metric(backend, "sam_sidecar_lost_total")  # a row or counted


def test_the_logits_memory_is_bounded_in_bytes():
    from sam_backend.segment.prompts import ObjectPrompt
    from sam_backend.serving.memory import ObjectMemory

    logits = np.zeros((256, 256), np.float32)
    memory = ObjectMemory(max_bytes=3 * logits.nbytes)
    prompts = [ObjectPrompt(np.array([[float(i), 5.0]]), np.array([1]), None, "a", None, None, (64, 48))
               for i in range(5)]
    for p in prompts:
        memory.remember("e", "img", p, logits)
    s = memory.stats()
    assert (s.entries, s.evictions, s.bytes) == (3, 2, 3 * logits.nbytes)
    second = [ObjectPrompt(np.array([[float(i), 5.0], [9.0, 9.0]]), np.array([1, 1]), None, "a", None, None, (64, 48))
              for i in range(5)]
    assert [memory.previous("e", "img", p) is not None for p in second] == [False, False, True, True, True]


def test_a_full_precompute_queue_drops_and_counts(tmp_path, caplog):
    from slow_engine import SlowEngine, write_images

    tags = {"a": 1, "b": 2, "c": 3, "d": 4}
    write_images(tmp_path, tags)
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_METADATA_DB": str(tmp_path / "s.db"),
                                  "SAM_PRECOMPUTE_QUEUE": "1"})
    engine = SlowEngine(encode_s=1.0)
    backend = SamBackend(settings, engine_factory=lambda: engine, recorder=lambda item: None)
    client = create_app(settings, backend=backend).test_client()
    opened = body_for("predict.task-opened")
    for name in tags:
        opened["tasks"][0]["data"]["image"] = f"{name}.png"
        assert client.post("/predict", json=opened).json["results"] == []
        if name == "a":
            assert engine.started.wait(10)  # a is encoding; the queue (1) takes b, then is full
    assert backend.prewarm.wait(30)
    assert engine.order == [1, 2] and metric(backend, "sam_precompute_dropped_total") == 2
    assert sum("precompute queue full" in r.getMessage() for r in caplog.records) == 2


def test_after_a_restart_a_setup_hostname_is_needed_again(tmp_path):
    """Without LABEL_STUDIO_URL (and without an API key), Label Studio's address comes only from /setup: a
    restarted backend says so clearly until Label Studio calls /setup again. A /setup never widens the address
    policy: its loopback hostname is fetched from only where SAM_ALLOWED_HOSTS names it."""
    import io as _io
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image as _Image

    png = _io.BytesIO()
    _Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(png, format="PNG")

    class Images(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(png.getvalue())))
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hostname = f"http://127.0.0.1:{httpd.server_address[1]}"
    body = body_for("predict.browser-1-click", image="/data/upload/3/a.png")
    for task in body["tasks"]:
        task["data"]["image"] = "/data/upload/3/a.png"
    for r in body["params"]["context"]["result"]:
        r["original_width"], r["original_height"] = 64, 48
    try:
        closed = Settings.from_env({"SAM_METADATA_DB": str(tmp_path / "s.db")})
        anyone = create_app(closed, backend=SamBackend(closed, engine_factory=GrabCutEngine,
                                                       recorder=lambda item: None)).test_client()
        anyone.post("/setup", json=dict(load_request("setup"), hostname=hostname))
        refused = anyone.post("/predict", json=body)
        assert refused.status_code == 403 and "loopback" in refused.json["errors"][0]
        settings = Settings.from_env({"SAM_METADATA_DB": str(tmp_path / "s.db"), "SAM_ALLOWED_HOSTS": "127.0.0.1"})
        first = create_app(settings, backend=SamBackend(settings, engine_factory=GrabCutEngine,
                                                        recorder=lambda item: None)).test_client()
        first.post("/setup", json=dict(load_request("setup"), hostname=hostname))
        assert first.post("/predict", json=body).status_code == 200
        restarted = create_app(settings, backend=SamBackend(settings, engine_factory=GrabCutEngine,
                                                            recorder=lambda item: None)).test_client()
        resp = restarted.post("/predict", json=body)
        assert resp.status_code == 400
        assert "LABEL_STUDIO_URL is not set (and no /setup call gave a hostname)" in resp.json["errors"][0]
        restarted.post("/setup", json=dict(load_request("setup"), hostname=hostname))
        assert restarted.post("/predict", json=body).status_code == 200
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("config", ["brush", "polygon"])
def test_sam2_engine_through_predict_refine_and_the_sidecar(scene, tiny_sam2_checkpoint, config):
    from sam_backend.segment.engines.sam2 import Sam2Engine

    client, backend, recorder = make(scene[0], engine_factory=lambda: Sam2Engine.from_checkpoint(
        tiny_sam2_checkpoint, device="cpu", precision="fp32"))
    body = body_for("predict.browser-1-click")
    if config == "polygon":
        body["label_config"] = POLYGON_CONFIG
    first = client.post("/predict", json=body)
    second = client.post("/predict", json=body_for("predict.browser-2-second-click"))
    assert first.status_code == 200 and second.status_code == 200, first.json
    regions = first.json["results"][0]["result"] + second.json["results"][0]["result"]
    assert regions, "the tiny SAM 2 gave no mask at all"
    for region in regions:
        assert region["type"] in ("brushlabels", "polygonlabels") and region["original_width"] == W
    assert backend.memory.objects.stats().hits == 1  # the second click was seeded with the first's logits
    recorder.flush()
    rows = Store(scene[0] / "sidecar.db").history()
    assert len(rows) == len(regions) and all(r["engine"].startswith("sam2/sam2.1_hiera_tiny/") for r in rows)


def test_a_brush_stroke_that_claims_gigabytes_is_refused_with_422_and_bounded_memory(scene):
    """A smart brush stroke whose RLE header claims 2^31 values (a few bytes of body) and one whose region is larger
    than SAM_MAX_IMAGE_PIXELS: both 422, saying what was expected, with the request's peak allocation small."""
    import tracemalloc

    from sam_backend.labelstudio.brush import encode_brush

    client, _, _ = make(scene[0])
    small = encode_brush(np.ones((48, 64), bool))
    bomb = list((2**31).to_bytes(4, "big")) + small[4:]
    body = body_for("predict.browser-1-click")
    stroke = {"type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": 64,
              "original_height": 48, "value": {"format": "rle", "rle": bomb, "brushlabels": ["Object"]}}
    body["params"]["context"]["result"] = [stroke]
    huge = json.loads(json.dumps(body))
    huge["params"]["context"]["result"][0].update(original_width=20000, original_height=20000)
    tracemalloc.start()
    try:
        first = client.post("/predict", json=body)
        second = client.post("/predict", json=huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.status_code == 422 and "declares 2147483648 values" in first.json["errors"][0]
    assert second.status_code == 422 and "SAM_MAX_IMAGE_PIXELS" in second.json["errors"][0]
    assert peak < 200 * 2**20  # the image's embedding and the app, not 2 GB of RLE values
