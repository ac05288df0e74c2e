"""The Label Studio protocol through Flask's test client, with real engines and images read from disk."""

from __future__ import annotations

import base64
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
    resp = client.post("/predict", json=body_for("predict.browser-3-alt-click-negative"))
    assert resp.status_code == 200 and len(resp.json["results"][0]["result"]) == 1


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
    client, _, _ = make(scene[0], env={"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret"})
    assert client.get("/health").status_code == 401
    bad = base64.b64encode(b"ann:wrong").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"ann:s3cret").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {good}"}).status_code == 200


def test_webhook_versions_metrics(scene):
    client, backend, _ = make(scene[0])
    for name in ("webhook.ANNOTATION_CREATED", "webhook.START_TRAINING"):
        assert client.post("/webhook", json=load_request(name)).status_code == 200
    assert client.get("/versions").json["versions"] == [backend.model_version]
    client.post("/predict", json=body_for("predict.browser-1-click"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'sam_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert "sam_cache_misses_total 1.0" in text and "sam_decoder_seconds_count 1.0" in text
