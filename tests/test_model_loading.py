"""A click that arrives while the model loads: answered at `SAM_CLICK_DEADLINE_S` with the time the load has left,
never held for the whole load; `/health` says loading, then ready.

The engine factory waits on an event before it returns a GrabCut engine: it stands in for a large checkpoint
loading on a slow disk (the behaviour under test is the waiting, not the masks)."""

from __future__ import annotations

import json
import threading

from conftest import load_request
from slow_engine import tagged_png

from sam_backend.config import Settings
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend
from sam_backend.serving.loader import EngineHolder, LoadTimes


def click_body() -> dict:
    body = load_request("predict.context-keypointlabels")
    for r in body["params"]["context"]["result"]:
        r["original_width"], r["original_height"] = 64, 48
        r["value"]["x"], r["value"]["y"] = 50, 50
    body["tasks"][0]["data"]["image"] = "/data/local-files/?d=a.png"
    return body


def test_a_click_during_the_load_is_answered_at_its_deadline_then_served(tmp_path):
    (tmp_path / "a.png").write_bytes(tagged_png(1))
    settings = Settings.from_env({"SAM_ENGINE": "grabcut", "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
                                  "SAM_CLICK_DEADLINE_S": "0.3", "SAM_METADATA_DB": str(tmp_path / "s.db")})
    release = threading.Event()

    def loading() -> GrabCutEngine:
        release.wait(60)
        return GrabCutEngine()

    backend = SamBackend(settings, engine_factory=loading)
    backend.engine.times = LoadTimes(tmp_path / "load.json")
    backend.engine.expected_s = 30.0  # as read from the previous start's file
    client = create_app(settings, backend=backend).test_client()
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["model"] == "loading" and health["model_load_s_left"] > 1
    resp = client.post("/predict", json=click_body())
    assert resp.status_code == 503
    message = resp.get_json()["errors"][0]
    assert message.startswith("model loading (about ") and "s left): click again" in message
    assert not backend.engine.ready  # answered while the load still runs
    release.set()
    assert backend.engine.wait(30) is not None
    assert client.get("/health").get_json()["model"] == "ready"
    resp = client.post("/predict", json=click_body())
    assert resp.status_code == 200 and resp.get_json()["results"][0]["result"]
    assert json.loads((tmp_path / "load.json").read_text())["load_s"] > 0  # the next start can say "about N s"
    assert "sam_model_ready 1.0" in client.get("/metrics").get_data(as_text=True)


def test_the_load_time_is_read_back_and_a_failed_load_says_why(tmp_path):
    times = LoadTimes(tmp_path / "load.json")
    assert times.read() is None
    times.write(4.2)
    holder = EngineHolder(GrabCutEngine, times)
    assert holder.expected_s == 4.2 and holder.state == "idle"
    (tmp_path / "torn.json").write_text("{")
    assert LoadTimes(tmp_path / "torn.json").read() is None

    def broken():
        raise RuntimeError("disk gone")

    failing = EngineHolder(broken)
    from sam_backend.segment.engines import EngineError

    try:
        failing.wait(5)
    except EngineError as exc:
        assert "disk gone" in str(exc)
    else:
        raise AssertionError("a failed load must raise")
    assert failing.state == "failed"
