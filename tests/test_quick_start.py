"""The torch-free start: a restart serves from the ONNX graphs the torch engine measured and checked (encoder and
decoder verdicts), without importing torch, with the torch engine's masks; the full engine takes over when loaded.

SAM's input frame in numpy (`sam_inputs`) is checked equal to segment-anything's own transforms; the engine holder's
switch is driven by events (no clock); the graphs are MobileSAM's real ones, checked on real photos."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, evalset, real_photo

from sam_backend.config import Settings
from sam_backend.segment.engines import EngineError
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.segment.engines.sam_inputs import (
    encoder_pixels,
    input_size,
    resize_longest,
    to_input_frame,
    upsample_mask,
)
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.simulator import first_click, iou, next_click
from sam_backend.serving.loader import EngineHolder, ModelLoading


@pytest.mark.parametrize("shape", [(321, 481), (480, 854), (854, 480), (1000, 3), (7, 1500), (256, 256)])
def test_the_input_frame_is_segment_anythings(tiny_engine, shape):
    """Resize, normalization and padding, and points moved into the frame: the same numbers as segment-anything's
    `ResizeLongestSide` and `Sam.preprocess` (the torch-free start encodes exactly what the torch engine encodes)."""
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    side = 1024
    image = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    theirs = ResizeLongestSide(side).apply_image(image)
    ours = resize_longest(image, side)
    assert ours.shape == theirs.shape and ours.shape[:2] == input_size(*shape, side)
    assert np.array_equal(ours, theirs)
    model = tiny_engine.model  # SAM's pixel mean and std, padding to the encoder's side
    small = resize_longest(image, model.image_encoder.img_size)
    expected = model.preprocess(torch.as_tensor(small).permute(2, 0, 1).contiguous()[None]).numpy()
    assert np.array_equal(encoder_pixels(small, model.image_encoder.img_size), expected)
    points = np.array([[0.0, 0.0], [shape[1] - 1, shape[0] / 3], [shape[1] / 2, shape[0] - 0.5]])
    assert np.allclose(to_input_frame(points, shape, ours.shape[:2]),
                       ResizeLongestSide(side).apply_coords(points, shape), atol=1e-4)


@pytest.mark.slow
def test_the_mask_brought_back_to_the_photo_is_segment_anythings(mobile_sam_engine):
    """`upsample_mask` (OpenCV) against `Sam.postprocess_masks` (torch) on MobileSAM's logits for real objects."""
    import torch

    engine = mobile_sam_engine
    for index in range(2):
        image, mask = real_photo("GrabCut", index)
        embedding = engine.embed(image)
        x, y, _ = first_click(mask)
        size = (mask.shape[1], mask.shape[0])
        prediction = engine.predict(embedding, ObjectPrompt(np.array([[x, y]]), np.array([1]), None, "o", None,
                                                            None, size))
        frame = tuple(embedding.meta["input_size"])
        for logits in prediction.low_res_logits:
            with torch.inference_mode():
                theirs = engine.model.postprocess_masks(torch.as_tensor(logits)[None, None], frame,
                                                        image.shape[:2])[0, 0].numpy() > 0
            ours = upsample_mask(logits, frame, image.shape[:2], 1024)
            assert ours.shape == theirs.shape and iou(ours, theirs) >= 0.999


# -- the engine holder: the quick engine serves, the full one takes over ------------------------------------------


def test_the_quick_engine_serves_until_the_full_one_is_built():
    quick, full = GrabCutEngine(), GrabCutEngine()
    release = threading.Event()

    def build_full() -> GrabCutEngine:
        release.wait(60)
        return full

    holder = EngineHolder(build_full, quick=lambda: quick)
    assert holder.stage is None and holder.state == "idle"
    assert holder.wait(30) is quick  # served while the full engine is still being built
    assert holder.state == "ready" and holder.stage == "quick" and holder.ready_s is not None
    assert holder.get() is quick and holder.peek() is quick
    assert holder.full(0.05) is None  # learning and adapted decoders wait for the full engine
    with pytest.raises(ModelLoading):
        holder.for_click(0.05, full=True)
    assert holder.for_click(0.05) is quick
    release.set()
    assert holder.full(None) is full
    assert holder.stage == "full" and holder.peek() is full and holder.for_click(0.05, full=True) is full
    assert holder.load_s >= holder.ready_s

    blocked = threading.Event()
    first = EngineHolder(lambda: blocked.wait(60) and full, quick=lambda: quick)
    assert first.get() is quick  # prewarm's `get` is served by the quick engine, not held for the full load
    blocked.set()
    assert first.full(None) is full


def test_a_failed_quick_start_loads_the_full_engine_and_a_failed_full_load_keeps_the_quick_one(caplog):
    full = GrabCutEngine()

    def broken_quick():
        raise RuntimeError("graph torn")

    holder = EngineHolder(lambda: full, quick=broken_quick)
    with caplog.at_level(logging.WARNING):
        assert holder.wait(30) is full
    assert holder.stage == "full" and "no torch-free start (RuntimeError: graph torn)" in caplog.text
    assert EngineHolder(lambda: full, quick=lambda: None).wait(30) is full  # nothing cached: torch as before

    quick = GrabCutEngine()

    def broken_full():
        raise EngineError("checkpoint damaged")

    holder = EngineHolder(broken_full, quick=lambda: quick)
    assert holder.wait(30) is quick
    with pytest.raises(EngineError, match="checkpoint damaged"):
        holder.full(30)
    assert holder.peek() is quick and holder.stage == "quick" and holder.error == "checkpoint damaged"


# -- MobileSAM's real graphs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(mobile_sam_checkpoint, tmp_path_factory) -> dict[str, str]:
    """MobileSAM in a folder of its own, started once by the torch engine with the ONNX encoder and decoder named
    (both measured and checked before it is ready): the environment of a restart with graphs and verdicts cached."""
    folder = tmp_path_factory.mktemp("quick")
    weights = folder / "mobile_sam.pt"
    shutil.copyfile(mobile_sam_checkpoint, weights)
    env = {"SAM_ENGINE": "sam", "SAM_CHECKPOINT": str(weights), "SAM_DEVICE": "cpu", "SAM_PRECISION": "fp32",
           "SAM_ENCODER": "onnx", "SAM_DECODER": "onnx", "SAM_CHECK_IMAGES": str(evalset("GrabCut") / "data_GT")}
    from sam_backend.segment.engines.factory import make_engine

    engine = make_engine(Settings.from_env(env))
    assert (engine.encoder_kind, engine.decoder_kind) == ("onnx", "onnx")
    return env


QUICK_CLICKS = """
import json, sys
import numpy as np
from sam_backend.config import Settings
from sam_backend.segment.engines.onnx_sam import quick_engine
from sam_backend.segment.prompts import ObjectPrompt

engine = quick_engine(Settings.from_env())
prompts = json.loads(sys.argv[1])
image = np.load(sys.argv[2])
embedding = engine.embed(image)
out = {"torch_imported": "torch" in sys.modules, "engine_id": engine.engine_id, "paths": [engine.encoder_kind,
       engine.decoder_kind]}
masks = []
for p in prompts:
    prompt = ObjectPrompt(np.array(p["points"], float).reshape(-1, 2), np.array(p["labels"]),
                          None if p["box"] is None else np.array(p["box"], float), "o", None, None, tuple(p["size"]))
    masks.append(engine.predict(embedding, prompt).best_mask)
np.save(sys.argv[3], np.stack(masks))
open(sys.argv[4], "wb").write(engine.dump(embedding))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_restart_serves_the_measured_graphs_without_torch_and_with_the_torch_engines_masks(measured, tmp_path):
    """In a fresh process, `quick_engine` serves from the graphs without importing torch; its embedding is the torch
    engine's (same id, loadable by it) and its masks, box and clicks on real objects, are the torch engine's."""
    from sam_backend.segment.engines.factory import make_engine

    image, mask = real_photo("GrabCut", 3)
    size = (mask.shape[1], mask.shape[0])
    full = make_engine(Settings.from_env(measured))
    x, y, _ = first_click(mask)
    ys, xs = np.nonzero(mask)
    click = ObjectPrompt(np.array([[x, y]]), np.array([1]), None, "o", None, None, size)
    fix = next_click(full.predict(full.embed(image), click).best_mask, mask)
    prompts = [click, ObjectPrompt(np.zeros((0, 2)), np.zeros(0), np.array([xs.min(), ys.min(), xs.max(), ys.max()],
                                                                           float), "o", None, None, size)]
    if fix is not None:
        prompts.append(ObjectPrompt(np.array([[x, y], fix[:2]]), np.array([1, int(fix[2])]), None, "o", None, None,
                                    size))
    sent = [{"points": p.points.tolist(), "labels": p.labels.tolist(),
             "box": None if p.box is None else p.box.tolist(), "size": list(size)} for p in prompts]
    np.save(tmp_path / "image.npy", image)
    env = {**os.environ, **measured, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", QUICK_CLICKS, json.dumps(sent), str(tmp_path / "image.npy"),
                           str(tmp_path / "masks.npy"), str(tmp_path / "embedding.bin")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"torch_imported": False, "engine_id": full.engine_id, "paths": ["onnx", "onnx"]}
    quick_masks = np.load(tmp_path / "masks.npy")
    embedding = full.load((tmp_path / "embedding.bin").read_bytes())  # the quick engine's encode, read by torch
    for prompt, ours in zip(prompts, quick_masks, strict=True):
        theirs = full.predict(full.embed(image), prompt).best_mask
        assert iou(ours, theirs) >= 0.999
        assert iou(full.predict(embedding, prompt).best_mask, theirs) >= 0.999
    assert iou(quick_masks[1], mask) >= 0.8  # the box finds the object


@pytest.mark.slow
def test_no_quick_engine_from_a_graph_or_verdict_that_does_not_match(measured, caplog):
    """Each graph is hashed against its verdict before it is loaded; settings the graphs do not serve, or no
    verdict for these weights and precision, start with torch as before, saying why."""
    from sam_backend.segment.engines.graph_files import decoder_file, encoder_file
    from sam_backend.segment.engines.onnx_sam import quick_engine

    settings = Settings.from_env(measured)
    assert quick_engine(settings) is not None
    for env, why in (({"SAM_ENCODER": "eager"}, "SAM_ENCODER=eager"), ({"SAM_DECODER": "compile"}, "SAM_DECODER"),
                     ({"SAM_DEVICE": "cuda"}, "GPU"), ({"SAM_PRECISION": "bf16"}, "no accepted ONNX encoder graph")):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert quick_engine(Settings.from_env({**measured, **env})) is None
        assert why in caplog.text
    checkpoint = Path(measured["SAM_CHECKPOINT"])
    weights = quick_engine(settings).id.weights
    for graph, why in ((decoder_file(checkpoint, weights), "no accepted ONNX decoder graph"),
                       (encoder_file(checkpoint, "onnx", "fp32", quick_engine(settings).engine_id),
                        "is not the graph measured")):
        kept = graph.read_bytes()
        try:
            graph.write_bytes(kept + b"\0")  # any other bytes: never loaded
            caplog.clear()
            with caplog.at_level(logging.INFO):
                assert quick_engine(settings) is None
            assert why in caplog.text
        finally:
            graph.write_bytes(kept)
    assert quick_engine(settings) is not None


@pytest.mark.slow
def test_a_restarted_server_is_ready_from_the_graphs_then_switches_to_the_full_engine(measured, tmp_path):
    """`sam-backend serve` after a start that measured: ready from the cached graphs (said in the log), clicks
    answered, then `/health` says the full engine serves; the same click's mask before and after the switch."""
    import requests

    from sam_backend.labelstudio.client import free_port
    from sam_backend.labelstudio.process import wait_for_health

    photo = tmp_path / "photo.png"
    image, mask = real_photo("GrabCut", 1)
    from PIL import Image

    Image.fromarray(image).save(photo)
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, **measured, "PYTHONPATH": str(ROOT), "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
           "SAM_METADATA_DB": str(tmp_path / "s.db")}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sam_backend", "serve", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url + "/health", proc, timeout_s=120)
        from conftest import load_request

        body = load_request("predict.context-keypointlabels")
        x, y, _ = first_click(mask)
        for r in body["params"]["context"]["result"]:
            r["original_width"], r["original_height"] = mask.shape[1], mask.shape[0]
            r["value"]["x"], r["value"]["y"] = 100 * x / mask.shape[1], 100 * y / mask.shape[0]
        body["tasks"][0]["data"]["image"] = "/data/local-files/?d=photo.png"
        first = requests.post(url + "/predict", json=body, timeout=120)
        assert first.status_code == 200, first.text
        health = {}
        for _ in range(600):  # the full load ends: no clock decides the outcome, only how long we look
            health = requests.get(url + "/health", timeout=10).json()
            if health.get("model_stage") == "full":
                break
            threading.Event().wait(0.2)
        assert health["model_stage"] == "full" and health["engine_ready"]
        assert health["ready_s"] < health["model_load_s"]  # served before the full engine was built
        again = requests.post(url + "/predict", json=body, timeout=120)
        assert again.status_code == 200
        a = first.json()["results"][0]["result"][0]["value"]["rle"]
        b = again.json()["results"][0]["result"][0]["value"]["rle"]
        assert a == b  # the same embedding (cached by the quick engine), the same decoder graph, the same mask
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "from the cached ONNX graphs (torch-free)" in text and "Traceback" not in text
