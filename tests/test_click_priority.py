"""Clicks go before background encodes, and a click never outlives Label Studio's timeout.

The engine's encode is slowed on purpose (`SlowEngine`); deadlines are scaled down through
`SAM_CLICK_DEADLINE_S`. Waits in the tests are bounded by generous deadlines, never asserted as durations.
"""

from __future__ import annotations

import time

from slow_engine import SlowEngine, write_images

from sam_backend.config import Settings
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""
TAGS = {"B": 11, "C": 22, "D": 33, "E": 44}


def open_task(name: str) -> dict:
    return {"tasks": [{"id": TAGS[name], "data": {"image": f"{name}.png"}}], "label_config": CONFIG,
            "params": {"context": None}}


def click(name: str) -> dict:
    return {"tasks": [{"id": TAGS[name], "data": {"image": f"{name}.png"}}], "label_config": CONFIG,
            "params": {"context": {"result": [
                {"original_width": 64, "original_height": 48, "type": "keypointlabels", "from_name": "kp",
                 "to_name": "image", "is_positive": True, "value": {"x": 50, "y": 50, "keypointlabels": ["Object"]}}]}}}


def make(tmp_path, encode_s: float, deadline_s: float = 60.0):
    write_images(tmp_path, TAGS)
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_METADATA_DB": str(tmp_path / "s.db"),
                                  "SAM_CLICK_DEADLINE_S": str(deadline_s)})
    engine = SlowEngine(encode_s)
    backend = SamBackend(settings, engine_factory=lambda: engine, recorder=lambda item: None)
    client = create_app(settings, backend=backend).test_client()
    return client, backend, engine


def metric(backend: SamBackend, name: str) -> float:
    for line in backend.metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        time.sleep(0.01)


def test_a_click_goes_before_queued_background_encodes(tmp_path):
    client, backend, engine = make(tmp_path, encode_s=1.0)  # room for the click to reach the gate
    for name in "CDE":
        assert client.post("/predict", json=open_task(name)).json["results"] == []
    assert engine.started.wait(10)  # C is encoding; D and E wait in the queue
    resp = client.post("/predict", json=click("B"))
    assert resp.status_code == 200 and len(resp.json["results"][0]["result"]) == 1
    # B was encoded right after the one encode that was running, before D and E.
    assert engine.order[:2] == [TAGS["C"], TAGS["B"]]
    assert backend.prewarm.wait(30)
    assert engine.order == [TAGS[n] for n in "CBDE"]  # nothing encoded twice
    assert metric(backend, "sam_background_yielded_total") >= 1
    assert metric(backend, "sam_click_encode_wait_seconds_count") == 1


def test_a_click_joining_a_queued_background_encode_of_its_image_promotes_it(tmp_path):
    client, backend, engine = make(tmp_path, encode_s=1.0)  # room for the click to reach the gate
    for name in "CDE":
        client.post("/predict", json=open_task(name))
    assert engine.started.wait(10)
    assert client.post("/predict", json=click("E")).status_code == 200  # E was queued last
    assert engine.order[:2] == [TAGS["C"], TAGS["E"]]
    assert backend.prewarm.wait(30) and engine.order == [TAGS[n] for n in "CED"]


def test_a_click_past_the_deadline_is_answered_and_the_encode_goes_on(tmp_path):
    client, backend, engine = make(tmp_path, encode_s=1.5, deadline_s=0.3)
    resp = client.post("/predict", json=click("B"))
    assert resp.status_code == 503
    message = resp.json["errors"][0]
    assert message.startswith("image still encoding (") and message.endswith("): click again")
    assert "still encoding" in resp.status  # the reason phrase, which Label Studio shows
    assert metric(backend, "sam_click_deadline_total") == 1
    wait_until(lambda: backend.cache.stats().entries == 1)
    resp = client.post("/predict", json=click("B"))
    assert resp.status_code == 200 and len(resp.json["results"][0]["result"]) == 1
    stats = backend.cache.stats()
    assert engine.order == [TAGS["B"]] and stats.misses == 1 and stats.hits >= 1


def test_the_estimate_comes_from_measured_encode_times(tmp_path):
    client, backend, engine = make(tmp_path, encode_s=1.0, deadline_s=0.2)
    client.post("/predict", json=open_task("C"))
    assert backend.prewarm.wait(30)  # one measured encode of about 1 s
    resp = client.post("/predict", json=click("B"))
    assert resp.status_code == 503
    seconds = int(resp.json["errors"][0].split("about ")[1].split(" s left")[0])
    assert 1 <= seconds <= 3


def test_the_gate_serves_clicks_before_background_work_that_waited_longer():
    """Background D waits at the gate before click B arrives; B still goes first (FIFO would give D)."""
    import threading

    from sam_backend.serving.encoder import BACKGROUND, CLICK, PriorityGate

    yielded = []
    gate = PriorityGate(on_yielded=lambda: yielded.append(1))
    order, release = [], threading.Event()

    def hold(priority, key, entered):
        with gate.hold(priority, key):
            order.append(key)
            if key == "C":
                entered.set()
                release.wait(10)

    c_in = threading.Event()
    threads = [threading.Thread(target=hold, args=(BACKGROUND, "C", c_in))]
    threads[0].start()
    assert c_in.wait(10)
    for priority, key in ((BACKGROUND, "D"), (BACKGROUND, "E"), (CLICK, "B")):
        t = threading.Thread(target=hold, args=(priority, key, threading.Event()))
        t.start()
        threads.append(t)
        wait_until(lambda k=key: k in gate._urgent or k in [e[2] for e in gate._waiting])
    gate.promote("E")  # a click joined E's background encode
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["C", "E", "B", "D"] and len(yielded) == 2
