"""The image encoder's paths (`SAM_ENCODER`) with MobileSAM's real weights on real photos: a graph is used only after
its masks matched fp32 eager ones, the fastest accepted one is chosen, the verdict is kept and read back at the
next start, and a graph with other weights is refused."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import evalset, real_photo

from sam_backend.config import Settings
from sam_backend.segment.checkpoints import sha256_file
from sam_backend.segment.engines.encoder_choice import (
    MIN_MASK_IOU,
    Verdict,
    apply_verdict,
    choose_encoder,
    measure_in_background,
    measure_paths,
    verdict_file,
)
from sam_backend.segment.engines.factory import make_engine
from sam_backend.segment.engines.fast_encoder import export_encoder
from sam_backend.segment.engines.graph_files import encoder_file
from sam_backend.segment.engines.sam import SamEngine
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.samples import check_images
from sam_backend.segment.simulator import first_click, iou

pytestmark = pytest.mark.slow


@pytest.fixture
def weights(mobile_sam_checkpoint, tmp_path):
    """MobileSAM's checkpoint copied into a folder of its own: graphs and verdicts are written beside it."""
    path = tmp_path / "mobile_sam.pt"
    shutil.copyfile(mobile_sam_checkpoint, path)
    return path


def photos() -> list[np.ndarray]:
    return check_images(evalset("GrabCut") / "data_GT", limit=2)


def test_the_onnx_encoder_gives_fp32_masks_and_is_chosen_where_fastest(weights):
    engine = SamEngine.from_checkpoint(weights, device="cpu", precision="fp32")
    images = photos()
    verdict = measure_paths(engine, weights, ("onnx",), images)
    onnx = verdict.result("onnx")
    assert onnx is not None and onnx.accepted and onnx.iou >= 0.999 and onnx.prompts >= 6
    eager = verdict.result("eager")
    assert eager is not None and eager.seconds == verdict.fp32_eager_s
    fastest = min((r for r in verdict.paths if r.accepted), key=lambda r: r.seconds)
    assert verdict.chosen == fastest.kind
    assert encoder_file(weights, "onnx", "fp32", engine.engine_id).is_file()
    # The graph's features give the eager encoder's masks on a real object, click by click.
    from sam_backend.segment.engines.fast_encoder import load_encoder

    fast = engine.with_encoder(load_encoder("onnx", encoder_file(weights, "onnx", "fp32", engine.engine_id), "fp32"))
    assert fast.encoder_kind == "onnx"
    image = images[0]
    a, b = engine.embed(image), fast.embed(image)
    assert float((a.features["image_embed"] - b.features["image_embed"]).abs().max()) < 1e-3


def test_a_graph_with_other_weights_is_refused(weights):
    """A graph file of another MobileSAM (random weights) planted where the export goes: it loads and runs, its
    masks do not match, so the path is refused and eager stays."""
    engine = SamEngine.from_checkpoint(weights, device="cpu", precision="fp32")
    other = SamEngine.random("vit_t", device="cpu", precision="fp32", seed=3)
    export_encoder("onnx", other.model.image_encoder, 1024, "fp32",
                   encoder_file(weights, "onnx", "fp32", engine.engine_id))
    verdict = measure_paths(engine, weights, ("onnx",), photos()[:1])
    onnx = verdict.result("onnx")
    assert onnx is not None and not onnx.accepted and onnx.iou < MIN_MASK_IOU and "IoU" in onnx.reason
    assert verdict.chosen == "eager"


def test_a_named_path_is_measured_once_and_its_verdict_read_at_the_next_start(weights, caplog):
    settings = Settings.from_env({"SAM_CHECKPOINT": str(weights), "SAM_DEVICE": "cpu", "SAM_PRECISION": "fp32",
                                  "SAM_DECODER": "eager", "SAM_ENCODER": "onnx",
                                  "SAM_CHECK_IMAGES": str(evalset("GrabCut") / "data_GT")})
    engine = make_engine(settings)
    assert engine.encoder_kind == "onnx"
    vfile = verdict_file(weights, "fp32")
    kept = json.loads(vfile.read_text())
    assert kept["engine_id"] == engine.engine_id and kept["images"] == 3
    graph = encoder_file(weights, "onnx", "fp32", engine.engine_id)
    stamp = graph.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = make_engine(settings)
    assert again.encoder_kind == "onnx" and graph.stat().st_mtime_ns == stamp
    assert "masks IoU against fp32 eager" not in caplog.text  # nothing measured again
    # A torn verdict is measured again; a removed graph falls back to eager with a warning.
    vfile.write_text("{not json")
    assert Verdict.read(vfile, engine.engine_id) is None
    graph.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = make_engine(settings)
    assert third.encoder_kind == "onnx" and graph.is_file()
    kept["paths"] = [p for p in kept["paths"] if p["kind"] != "onnx"] + [
        {"kind": "onnx", "precision": "fp32", "accepted": True, "seconds": 0.1, "iou": 1.0}]
    kept["chosen"] = "onnx"
    vfile.write_text(json.dumps(kept))
    graph.unlink()
    with caplog.at_level(logging.WARNING):
        fourth = make_engine(settings)
    # a verdict whose graph is missing (and that kept no SHA-256 of it) is measured again, never trusted
    assert "cannot be loaded" in caplog.text and fourth.encoder_kind == "onnx" and graph.is_file()
    measured = Verdict.read(vfile, engine.engine_id).result("onnx")
    assert measured.sha256 == sha256_file(graph)


def test_a_graph_swapped_after_its_verdict_is_never_loaded(weights, caplog):
    """The verdict keeps the SHA-256 of the graph it measured: a graph file replaced afterwards (here: the export of
    another model's encoder, which loads and runs) is refused before loading, and measured again."""
    settings = Settings.from_env({"SAM_CHECKPOINT": str(weights), "SAM_DEVICE": "cpu", "SAM_PRECISION": "fp32",
                                  "SAM_DECODER": "eager", "SAM_ENCODER": "onnx",
                                  "SAM_CHECK_IMAGES": str(evalset("GrabCut") / "data_GT")})
    engine = make_engine(settings)
    assert engine.encoder_kind == "onnx"
    graph = encoder_file(weights, "onnx", "fp32", engine.engine_id)
    assert engine.engine_id.split("/")[2] in graph.name  # named by the weights' digest
    vfile = verdict_file(weights, "fp32")
    verdict = Verdict.read(vfile, engine.engine_id)
    other = SamEngine.random("vit_t", device="cpu", precision="fp32", seed=5)
    export_encoder("onnx", other.model.image_encoder, 1024, "fp32", graph)  # swapped in place
    swapped = sha256_file(graph)
    assert swapped != verdict.result("onnx").sha256
    fresh = SamEngine.from_checkpoint(weights, device="cpu", precision="fp32")
    with caplog.at_level(logging.WARNING):
        assert apply_verdict(fresh, verdict, weights) == "eager"
    assert fresh.fast_encoder is None and "not the file that was measured" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = make_engine(settings)  # a named path: measured again, the graph exported anew from these weights
    assert "not the file that was measured" in caplog.text and again.encoder_kind == "onnx"
    assert sha256_file(graph) != swapped
    assert Verdict.read(vfile, engine.engine_id).result("onnx").sha256 == sha256_file(graph)


def test_auto_measures_in_the_background_then_switches_and_a_restart_reuses_the_verdict(weights, caplog):
    """The first start serves with eager at once and measures every path in a low-priority child process; the
    engine then runs the chosen path. The second start reads the verdict: no measurement, the chosen path at once.
    The chosen path's masks on a real object match the fp32 eager ones."""
    engine = SamEngine.from_checkpoint(weights, device="cpu", precision="auto")
    check = evalset("GrabCut") / "data_GT"
    assert choose_encoder(engine, "auto", weights, check) == "eager"
    assert engine.encoder_tuning is not None and engine.encoder_kind == "eager"
    engine.encoder_tuning.join()  # ends by MEASURE_LIMIT_S at the latest
    assert not engine.encoder_tuning.is_alive()
    verdict = Verdict.read(verdict_file(weights, engine.precision), engine.engine_id)
    assert verdict is not None, "the background measurement wrote no verdict"
    assert {p.kind for p in verdict.paths} >= {"onnx", "aoti"}
    assert engine.encoder_kind == verdict.chosen
    accepted = [p for p in verdict.paths if p.accepted]
    assert verdict.chosen == min(accepted, key=lambda p: p.seconds).kind if accepted else verdict.chosen == "eager"

    restarted = SamEngine.from_checkpoint(weights, device="cpu", precision="auto")
    assert choose_encoder(restarted, "auto", weights, check) == verdict.chosen
    assert restarted.encoder_tuning is None and restarted.encoder_kind == verdict.chosen  # read, not measured

    image, mask = real_photo("GrabCut", 0)
    reference = restarted.with_encoder(None).with_precision("fp32")
    x, y, _ = first_click(mask)
    prompt = ObjectPrompt(np.array([[x, y]]), np.array([1]), None, "o", None, None, (mask.shape[1], mask.shape[0]))
    a = reference.predict(reference.embed(image), prompt).best_mask
    b = restarted.predict(restarted.embed(image), prompt).best_mask
    assert iou(a, b) >= 0.95 and iou(b, mask) >= 0.8


def test_bench_prints_every_encoder_path_with_its_iou_against_fp32(weights):
    """`sam-backend bench` with the real weights: each encoder path measured, with its speed-up over fp32 eager and
    its masks' IoU against fp32 eager on the check photos; the click figures run with the chosen one."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "SAM_CHECKPOINT": str(weights), "SAM_PRECISION": "fp32", "SAM_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "sam_backend", "bench", "--json", "--encoder", "onnx", "--decoder",
                           "eager", "--no-http", "--repeats", "1", "--check-images",
                           str(evalset("GrabCut") / "data_GT")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["kind"]: r for r in result["encoders"]}
    assert set(rows) == {"eager", "onnx"} and rows["eager"]["speedup"] == 1.0
    assert rows["onnx"]["accepted"] and rows["onnx"]["iou"] >= 0.999 and rows["onnx"]["speedup"] > 0
    assert result["encoder_check_images"] == 3 and result["encoder_prompts"] >= 6
    assert result["encoder"] == ("onnx" if rows["onnx"]["seconds"] < rows["eager"]["seconds"] else "eager")


def _children_measuring() -> list[int]:
    """PIDs of encoder measurements running now (the `encoder_choice` child), read from /proc."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"sam_backend.segment.engines.encoder_choice" in cmd:
            found.append(int(proc.name))
    return found


@pytest.mark.integration
def test_the_measuring_child_runs_at_the_lowest_priority_and_dies_with_its_backend(weights, tmp_path):
    """`sam-backend serve` with SAM_ENCODER=auto and no verdict measures in a child process; that child runs at nice
    19, and a backend stopped with SIGTERM mid-measurement leaves no child behind (six were seen compiling for up to
    30 minutes after their backends had ended)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests

    from sam_backend.labelstudio.client import free_port

    checkpoint = weights  # in this test's folder: graphs and verdict go beside it, none yet
    port = free_port()
    env = {**os.environ, "SAM_CHECKPOINT": str(checkpoint), "SAM_ENCODER": "auto", "SAM_DECODER": "eager",
           "SAM_METADATA_DB": str(tmp_path / "s.db")}
    before = set(_children_measuring())
    backend = subprocess.Popen([sys.executable, "-m", "sam_backend", "serve", "--host", "127.0.0.1", "--port",
                                str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        children: list[int] = []
        while not children:
            assert time.monotonic() < deadline and backend.poll() is None, "no measurement started"
            children = [p for p in _children_measuring() if p not in before]
            time.sleep(0.2)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["encoder"] in ("measuring", "eager")
        assert os.getpriority(os.PRIO_PROCESS, children[0]) == 19
        if len(os.sched_getaffinity(0)) > 1:  # one core measures, the other is left to clicks
            assert len(os.sched_getaffinity(children[0])) == 1
        backend.send_signal(signal.SIGTERM)
        backend.wait(60)
        deadline = time.monotonic() + 30
        while set(children) & set(_children_measuring()):
            assert time.monotonic() < deadline, "the measuring child outlived its backend"
            time.sleep(0.2)
    finally:
        if backend.poll() is None:
            backend.kill()
        for p in [p for p in _children_measuring() if p not in before]:
            os.kill(p, signal.SIGKILL)


def test_a_measurement_past_its_time_limit_is_abandoned_and_eager_serves(weights, caplog):
    """A measurement still running at its limit is killed (no child left compiling), logged, and writes no verdict;
    the engine keeps the eager encoder. Driven to its end by joining the thread that waits for it."""
    engine = SamEngine.from_checkpoint(weights, device="cpu", precision="auto")
    vfile = verdict_file(weights, engine.precision)
    before = set(_children_measuring())
    with caplog.at_level(logging.WARNING):
        measure_in_background(engine, weights, vfile, None, limit_s=1.0).join()
    assert "abandoned after 1 s" in caplog.text
    assert engine.encoder_kind == "eager" and Verdict.read(vfile, engine.engine_id) is None
    assert set(_children_measuring()) <= before


def test_make_engine_can_wait_for_the_measurement_so_a_run_uses_one_path(weights, tmp_path):
    """`evaluate`'s engine: with `settle_encoder` the first start's measurement has ended when `make_engine` returns,
    and the engine already runs the path it chose (no switch in the middle of a run)."""
    settings = Settings.from_env({"SAM_CHECKPOINT": str(weights), "SAM_ENCODER": "auto", "SAM_DECODER": "eager",
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    engine = make_engine(settings, settle_encoder=True)
    assert engine.encoder_tuning is not None and not engine.encoder_tuning.is_alive()
    verdict = Verdict.read(verdict_file(weights, engine.precision), engine.engine_id)
    assert verdict is not None and engine.encoder_kind == verdict.chosen
