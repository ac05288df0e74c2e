"""The click's decoder path: the ONNX Runtime graph against the eager decoder, its cache next to the checkpoint,
and the stage timings a running server shows (`Server-Timing`, `/metrics`)."""

from __future__ import annotations

import logging
import shutil

import cv2
import numpy as np
import pytest
from conftest import load_request
from synthetic import disc_scene

from sam_backend.config import Settings
from sam_backend.segment.engines.factory import make_engine
from sam_backend.segment.engines.sam import SamEngine
from sam_backend.segment.engines.sam2 import Sam2Engine
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.samples import bench_prompts
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def prompts_for(width: int, height: int) -> list[tuple[ObjectPrompt, bool]]:
    """The bench table (clicks, negative click, box, box and click) and a brush stroke, each as a first click
    and as a click seeded with the previous logits."""
    table = bench_prompts(width, height)
    stroke = np.zeros((height, width), bool)
    cv2.line(stroke.view(np.uint8), (width // 4, height // 2), (width // 2, height // 2), 1, 5)
    on_stroke = np.array([[width * 3 / 8, height / 2]], np.float32)  # the context samples points on a stroke
    table.append(ObjectPrompt(on_stroke, np.array([1]), None, "a", None, None, (width, height), stroke=stroke))
    return [(p, seeded) for p in table for seeded in (False, True)]


def assert_same_masks(engine, embedding, width, height) -> None:
    """Every prompt: the same candidates chosen, full-resolution masks IoU ≥ 0.999, scores within 1e-4."""
    for prompt, seeded in prompts_for(width, height):
        prev = None
        if seeded:
            first = engine.predict_with(None, embedding, prompt)
            prev = first.low_res_logits[first.best]
        slow = engine.predict_with(None, embedding, prompt, prev)
        fast = engine.predict_with(engine.fast_decoder, embedding, prompt, prev)
        assert fast.scores.shape == slow.scores.shape
        assert np.allclose(fast.scores, slow.scores, atol=1e-4)
        for i in range(len(slow.scores)):
            assert iou(fast.mask(i), slow.mask(i)) >= 0.999, (prompt, seeded, i)


@pytest.fixture()
def own_tiny_sam(tiny_checkpoint, tmp_path):
    """A tiny SAM engine of its own (`use_decoder` changes an engine) with its checkpoint in `tmp_path`."""
    path = tmp_path / "tiny_sam.pth"
    shutil.copy(tiny_checkpoint, path)
    return SamEngine.from_checkpoint(path, device="cpu", precision="fp32"), path


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_onnx_decoder_gives_the_eager_masks_on_the_tiny_models(family, tiny_checkpoint, tiny_sam2_checkpoint):
    engine = (SamEngine.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32") if family == "sam" else
              Sam2Engine.from_checkpoint(tiny_sam2_checkpoint, device="cpu", precision="fp32"))
    assert engine.use_decoder("onnx") == "onnx" and engine.decoder_kind == "onnx"
    image, _, _ = disc_scene()
    embedding = engine.embed(image)
    assert_same_masks(engine, embedding, image.shape[1], image.shape[0])
    # The two paths are distinct computations: their logits agree closely but not by accident of identity.
    prompt = bench_prompts(image.shape[1], image.shape[0])[0]
    fast = engine.predict(embedding, prompt).low_res_logits
    slow = engine.predict_with(None, embedding, prompt).low_res_logits
    assert np.allclose(fast, slow, atol=1e-3)


@pytest.mark.parametrize("model_type", ["vit_b", "sam2.1_hiera_tiny"])
def test_onnx_decoder_gives_the_eager_masks_on_full_size_random_weights(model_type):
    """ViT-B and Hiera-T at full size (random weights: the decoder's arithmetic, not its meaning, is compared)."""
    cls = SamEngine if model_type == "vit_b" else Sam2Engine
    engine = cls.random(model_type, device="cpu", precision="fp32")
    assert engine.use_decoder("onnx") == "onnx"
    _, _, embedding = engine.decoder_graph()
    assert_same_masks(engine, embedding, *embedding.image_size)


def test_eager_setting_and_auto(own_tiny_sam):
    engine, _ = own_tiny_sam
    assert engine.use_decoder("eager") == "eager" and engine.fast_decoder is None
    assert engine.use_decoder("auto") == "onnx"  # a CPU with onnxruntime installed
    with pytest.raises(ValueError, match="SAM_DECODER: expected one of"):
        engine.use_decoder("tensorrt")


def settings_for(path, tmp_path, **env) -> Settings:
    return Settings.from_env({"SAM_CHECKPOINT": str(path), "SAM_DEVICE": "cpu", "SAM_PRECISION": "fp32",
                              "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_METADATA_DB": str(tmp_path / "s.db"),
                              **env})


def test_the_export_is_cached_next_to_the_checkpoint_and_reused(own_tiny_sam, tmp_path, caplog):
    _, path = own_tiny_sam
    engine = make_engine(settings_for(path, tmp_path))
    assert engine.decoder_kind == "onnx"
    cached = list(tmp_path.glob("tiny_sam.pth.decoder-*.onnx"))
    assert len(cached) == 1 and engine.engine_id.split("/")[2] in cached[0].name
    stamp = cached[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = make_engine(settings_for(path, tmp_path))
    assert again.decoder_kind == "onnx" and cached[0].stat().st_mtime_ns == stamp
    assert "decoder graph read from" in caplog.text


@pytest.mark.parametrize("bad", ["torn", "foreign", "other-weights"])
def test_a_bad_cached_export_is_replaced_not_used(bad, own_tiny_sam, tiny_sam2_checkpoint, tmp_path, caplog):
    """A torn file, another model's graph (other inputs), or the same graph with other weights: each is found
    out (ONNX Runtime refuses it, its inputs differ, or its masks disagree with eager) and exported again."""
    from conftest import build_tiny_sam

    from sam_backend.segment.engines.fast_decoder import export_onnx

    engine, path = own_tiny_sam
    cache = engine.decoder_cache(path)
    if bad == "torn":
        cache.write_bytes(b"\x08\x07not an onnx model")
    else:
        other = (Sam2Engine.from_checkpoint(tiny_sam2_checkpoint, device="cpu", precision="fp32") if bad == "foreign"
                 else SamEngine(build_tiny_sam(seed=5), device=engine.device, precision="fp32", weights_id="x/y"))
        graph, example, _ = other.decoder_graph()
        cache.write_bytes(export_onnx(graph, example, ("point_coords", "point_labels")))
    planted = cache.read_bytes()
    with caplog.at_level(logging.WARNING):
        assert engine.use_decoder("onnx", cache) == "onnx"
    assert cache.read_bytes() != planted
    assert "ignored the cached decoder graph" in caplog.text or "gives other masks" in caplog.text
    image, _, _ = disc_scene()
    assert_same_masks(engine, engine.embed(image), image.shape[1], image.shape[0])


def test_an_unwritable_checkpoint_dir_still_gives_the_fast_decoder(own_tiny_sam, tmp_path, caplog):
    engine, path = own_tiny_sam
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache's directory would be")
    with caplog.at_level(logging.WARNING):
        assert engine.use_decoder("onnx", blocked / "graph.onnx") == "onnx"
    assert "could not cache the decoder graph" in caplog.text


def test_a_click_reports_its_stages(own_tiny_sam, tmp_path):
    """Through the app with the production engine path (`make_engine`, SAM_DECODER=auto): the click is answered
    by the ONNX decoder, says its stages in `Server-Timing`, and `/metrics` has them as histograms."""
    _, path = own_tiny_sam
    image, _, _ = disc_scene()
    body = load_request("predict.context-keypointlabels")
    h, w = image.shape[:2]
    for r in body["params"]["context"]["result"]:
        r["original_width"], r["original_height"] = w, h
    body["tasks"][0]["data"]["image"] = "/data/local-files/?d=scene.png"
    cv2.imwrite(str(tmp_path / "scene.png"), image[:, :, ::-1])
    settings = settings_for(path, tmp_path)
    backend = SamBackend(settings, recorder=lambda _: None)
    client = create_app(settings, backend=backend, start=False).test_client()
    assert client.get("/health").get_json()["decoder"] is None  # not loaded yet
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["results"][0]["result"][0]["value"]["rle"]
    timing = dict(part.split(";dur=") for part in resp.headers["Server-Timing"].split(", "))
    assert set(timing) == {"embedding", "decoder", "upsample", "refine", "rle", "json"}
    assert all(float(v) >= 0 for v in timing.values()) and float(timing["embedding"]) > float(timing["json"])
    assert client.get("/health").get_json()["decoder"] == "onnx"
    metrics = client.get("/metrics").get_data(as_text=True)
    for stage in timing:
        assert f'sam_click_stage_seconds_count{{stage="{stage}"}} 1.0' in metrics
    assert 'sam_decoder_info{kind="onnx"} 1.0' in metrics
    # A task opened (no context): nothing segmented, no stages observed, no header.
    opened = client.post("/predict", json={**body, "params": {}})
    assert opened.status_code == 200 and "Server-Timing" not in opened.headers
    assert 'sam_click_stage_seconds_count{stage="decoder"} 1.0' in client.get("/metrics").get_data(as_text=True)


def test_only_the_chosen_mask_is_upsampled_and_it_equals_the_reference_on_vit_b():
    """ViT-B, random weights, eager: the engine upsamples only the candidate it is asked for; each equals what
    segment-anything's own steps give when every candidate is upsampled first (`postprocess_masks` of all)."""
    import torch

    engine = SamEngine.random("vit_b", device="cpu", precision="fp32")
    _, _, embedding = engine.decoder_graph()
    model = engine.model
    original, input_size = embedding.image_size.shape, tuple(embedding.meta["input_size"])
    for prompt, _ in prompts_for(*embedding.image_size)[::2]:
        ours = engine.predict(embedding, prompt)
        assert ours.masks_ is None  # nothing upsampled yet
        with torch.inference_mode():
            low = torch.as_tensor(ours.low_res_logits)[None]
            reference = (model.postprocess_masks(low, input_size, original) > model.mask_threshold)[0].numpy()
        assert np.array_equal(ours.best_mask, reference[ours.best])
        assert np.array_equal(ours.masks, reference)


def test_the_verdict_is_kept_with_the_graph_and_a_restart_does_not_check_again(own_tiny_sam, tmp_path, caplog):
    """An accepted export's verdict is written beside it, tied to the graph's bytes; the next start uses it without
    checking (no "decoder check"/"masks IoU" line, the graph untouched)."""
    import json

    from sam_backend.segment.engines.torch_engine import decoder_verdict_file

    engine, path = own_tiny_sam
    cache = engine.decoder_cache(path)
    assert engine.use_decoder("onnx", cache) == "onnx"
    verdict = json.loads(decoder_verdict_file(cache).read_text())
    assert verdict["accepted"] is True and verdict["engine_id"] == engine.engine_id and verdict["iou"] >= 0.999
    calls = []
    original = engine.compare_decoder
    engine.compare_decoder = lambda *a: calls.append(1) or original(*a)
    stamp = cache.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert engine.use_decoder("onnx", cache) == "onnx"
    assert calls == [] and cache.stat().st_mtime_ns == stamp and "verdict in" in caplog.text
    image, _, _ = disc_scene()
    assert_same_masks(engine, engine.embed(image), image.shape[1], image.shape[0])
    # The graph's bytes changed since (another export, a tampered file): the verdict no longer holds, it is checked.
    cache.write_bytes(cache.read_bytes() + b"\x00")
    assert engine.use_decoder("onnx", cache) in ("onnx", "eager") and calls


def test_a_refused_verdict_is_not_exported_again(own_tiny_sam, caplog):
    """A graph refused at an earlier start (its verdict says so) is neither exported nor checked again: eager at
    once, with the reason in the log."""
    import json

    from sam_backend.segment.engines.torch_engine import decoder_verdict_file

    engine, path = own_tiny_sam
    cache = engine.decoder_cache(path)
    assert engine.use_decoder("onnx", cache) == "onnx"
    vfile = decoder_verdict_file(cache)
    verdict = json.loads(vfile.read_text())
    vfile.write_text(json.dumps({**verdict, "accepted": False, "iou": 0.9972}))
    stamp = cache.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        assert engine.use_decoder("onnx", cache) == "eager"
    assert engine.decoder_kind == "eager" and cache.stat().st_mtime_ns == stamp
    assert "was refused" in caplog.text and "0.9972" in caplog.text
