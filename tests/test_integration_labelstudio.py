"""End to end through the real Label Studio 1.23.2: projects from label_config/, uploaded images,
the backend registered as interactive, and `POST /api/ml/{id}/interactive-annotating`.

Label Studio runs as a subprocess (sam_backend/labelstudio.py); the backend runs in this process on a
werkzeug server thread on 127.0.0.1, so a "restart" is a new app and a new backend on the same port.
"""

from __future__ import annotations

import io
import json
import threading
import time

import cv2
import numpy as np
import pytest
import requests
from conftest import ROOT
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from synthetic import iou, textured_background
from werkzeug.serving import make_server

from sam_backend.config import Settings
from sam_backend.labelstudio.client import free_port
from sam_backend.labelstudio.process import LabelStudio
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend
from sam_backend.sidecar.store import AsyncRecorder, Store

pytestmark = pytest.mark.integration

W, H = 640, 480
CENTER, RADIUS = (250, 200), 80


def scene() -> tuple[np.ndarray, np.ndarray]:
    image = textured_background(H, W, seed=5)
    mask = np.zeros((H, W), np.uint8)
    cv2.circle(mask, CENTER, RADIUS, 1, -1)
    image[mask > 0] = (230, 120, 30)
    return image, mask.astype(bool)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def exif_rotated_jpeg(image: np.ndarray) -> bytes:
    """Pixels stored rotated 90° counter-clockwise with EXIF orientation 6 (display: rotate 90° clockwise)."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(image, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


class BackendThread:
    """The real Flask app on a real socket; `restart()` builds a fresh backend (no /setup call)."""

    def __init__(self, settings: Settings, engine_factory) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> BackendThread:
        self.recorder = AsyncRecorder(Store(self.settings.metadata_db))
        self.backend = SamBackend(self.settings, engine_factory=self.engine_factory, recorder=self.recorder)
        app = create_app(self.settings, backend=self.backend)
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    server = LabelStudio(tmp_path_factory.mktemp("ls-data"), "admin@example.com", "integration-Passw0rd").start()
    yield server
    server.stop()


def backend_for(ls: LabelStudio, tmp_path, engine_factory=GrabCutEngine, api_key: str | None = None):
    settings = Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": api_key or ls.pat,
                                  "SAM_ENGINE": "grabcut", "SAM_METADATA_DB": str(tmp_path / "sidecar.db")})
    return BackendThread(settings, engine_factory).start()


def keypoint(x, y, positive=True, name="kp", w=W, h=H):
    return {"original_width": w, "original_height": h, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x / w * 100, "y": y / h * 100, "width": 0.3, "keypointlabels": ["Object"],
                      "labels": ["Object"]},
            "id": f"k{x}_{y}", "from_name": name, "to_name": "image", "type": "keypointlabels", "origin": "manual"}


def rectangle(x1, y1, x2, y2, w=W, h=H):
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x1 / w * 100, "y": y1 / h * 100, "width": (x2 - x1) / w * 100,
                      "height": (y2 - y1) / h * 100, "rotation": 0, "rectanglelabels": ["Object"]},
            "id": f"r{x1}", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}


def region_mask(result: dict) -> np.ndarray:
    h, w = result["original_height"], result["original_width"]
    if result["type"] == "brushlabels":
        return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
    pts = np.array(result["value"]["points"]) / 100 * [w, h]
    out = np.zeros((h, w), np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out.astype(bool)


def setup_project(ls: LabelStudio, config_file: str, files: dict[str, bytes], backend: BackendThread):
    project = ls.create_project(config_file, (ROOT / "label_config" / config_file).read_text())
    tasks = ls.upload(project, files)
    ml = ls.add_ml_backend(project, backend.url)
    return project, tasks, ml


CX, CY = CENTER
CASES = {
    "keypoint": [keypoint(CX, CY)],
    "keypoint+negative": [keypoint(CX, CY), keypoint(CX + RADIUS + 40, CY, positive=False)],
    "rectangle": [rectangle(CX - RADIUS - 10, CY - RADIUS - 10, CX + RADIUS + 10, CY + RADIUS + 10)],
    "rectangle+points": [rectangle(CX - RADIUS - 10, CY - RADIUS - 10, CX + RADIUS + 10, CY + RADIUS + 10),
                         keypoint(CX + 20, CY + 10)],
}


@pytest.mark.parametrize("config_file", ["points-and-boxes-brush.xml", "points-and-boxes-polygon.xml"])
def test_interactive_masks_through_label_studio(ls, tmp_path, config_file):
    image, truth = scene()
    backend = backend_for(ls, tmp_path)
    try:
        _, [task], ml = setup_project(ls, config_file, {"disc.png": png_bytes(image)}, backend)
        kind = "brushlabels" if "brush" in config_file else "polygonlabels"
        for name, context in CASES.items():
            answer = ls.interactive(ml, task, context)
            assert "errors" not in answer, (name, answer)
            [region] = answer["data"]["result"]
            assert region["type"] == kind and region["original_width"] == W and region["original_height"] == H
            assert iou(region_mask(region), truth) >= 0.8, name
        backend.recorder.flush()
        rows = Store(tmp_path / "sidecar.db").history(task=task)
        assert len(rows) == len(CASES) and all(r["image_url"].startswith("/data/upload/") for r in rows)
    finally:
        backend.stop()


def test_exif_rotated_jpeg(ls, tmp_path):
    image, truth = scene()  # the displayed (upright) frame
    backend = backend_for(ls, tmp_path)
    try:
        _, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"rotated.jpg": exif_rotated_jpeg(image)},
                                      backend)
        answer = ls.interactive(ml, task, [keypoint(CX, CY)])
        [region] = answer["data"]["result"]
        assert (region["original_width"], region["original_height"]) == (W, H)
        mask = region_mask(region)
        # JPEG noise costs GrabCut some of the disc; a wrong orientation would put the mask elsewhere.
        assert iou(mask, truth) >= 0.7 and (mask & truth).sum() / mask.sum() >= 0.95
    finally:
        backend.stop()


def test_tiny_sam_gives_a_mask_of_the_image_size(ls, tmp_path, tiny_checkpoint):
    from sam_backend.segment.engines.sam import SamEngine

    image, _ = scene()
    backend = backend_for(ls, tmp_path, engine_factory=lambda: SamEngine.from_checkpoint(tiny_checkpoint,
                                                                                          device="cpu"))
    try:
        project, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"tiny.png": png_bytes(image)},
                                            backend)
        config = ls.project(project)["label_config"]
        seen = 0
        for context in CASES.values():
            answer = ls.interactive(ml, task, context)
            # Random weights may give an empty mask (then a 422 that says so); the backend asked directly says what
            # Label Studio must pass on.
            resp = requests.post(backend.url + "/predict", json={
                "tasks": [ls.task(task)], "label_config": config, "params": {"context": {"result": context}}},
                timeout=60)
            if resp.status_code == 422:
                assert resp.json()["errors"][0] in answer["errors"][0]
                continue
            assert "errors" not in answer, answer
            direct = resp.json()["results"][0]["result"]
            regions = answer["data"]["result"]
            assert len(regions) == len(direct)
            for region, expected in zip(regions, direct, strict=True):
                assert region_mask(region).shape == (H, W)
                assert np.array_equal(region_mask(region), region_mask(expected))
                assert region["value"]["brushlabels"] == ["Object"]
            seen += len(regions)
        assert seen >= 1  # at least one case gave a mask, so the checks above ran
    finally:
        backend.stop()


def test_sam2_engine_through_label_studio(ls, tmp_path, tiny_sam2_checkpoint):
    """The full /predict path for SAM 2.1 (a tiny one): Label Studio → backend → its answer, region for region."""
    from sam_backend.segment.engines.sam2 import Sam2Engine

    image, _ = scene()
    backend = backend_for(ls, tmp_path, engine_factory=lambda: Sam2Engine.from_checkpoint(
        tiny_sam2_checkpoint, device="cpu", precision="fp32"))
    try:
        project, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"sam2.png": png_bytes(image)},
                                            backend)
        config = ls.project(project)["label_config"]
        answer = ls.interactive(ml, task, [keypoint(CX, CY)])
        assert "errors" not in answer, answer
        direct = requests.post(backend.url + "/predict", json={
            "tasks": [ls.task(task)], "label_config": config, "params": {"context": {"result": [keypoint(CX, CY)]}}},
            timeout=60).json()["results"][0]["result"]
        [region] = answer["data"]["result"]
        assert len(direct) == 1 and np.array_equal(region_mask(region), region_mask(direct[0]))
        assert region_mask(region).shape == (H, W) and region["value"]["brushlabels"] == ["Object"]
        assert backend.backend.engine.get().engine_id.startswith("sam2/")
    finally:
        backend.stop()


def test_legacy_token_is_refused_with_a_clear_message(ls, tmp_path):
    image, _ = scene()
    backend = backend_for(ls, tmp_path, api_key=ls.legacy_token())
    try:
        _, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"legacy.png": png_bytes(image)}, backend)
        answer = ls.interactive(ml, task, [keypoint(CX, CY)])
        [message] = answer["errors"]
        assert "401" in message and "personal access token" in message
        assert ls.legacy_token() not in message and ls.pat not in message
    finally:
        backend.stop()


def test_box_then_alt_click_through_label_studio(ls, tmp_path):
    """Held scene (GrabCut): a smart rectangle leaks into the touching bar (IoU 0.75); the Alt-click on the bar,
    which Label Studio sends alone, refines that box's object (IoU 1.00)."""
    from synthetic import touching_scene

    scene = touching_scene()
    backend = backend_for(ls, tmp_path)
    try:
        _, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"touching.png": png_bytes(scene["image"])},
                                      backend)
        [boxed] = ls.interactive(ml, task, [rectangle(*scene["box"])])["data"]["result"]
        answer = ls.interactive(ml, task, [keypoint(*scene["negative"], positive=False)])
        assert "errors" not in answer, answer
        [refined] = answer["data"]["result"]
        before, after = iou(region_mask(boxed), scene["target"]), iou(region_mask(refined), scene["target"])
        assert before < 0.8 and after >= 0.9, (before, after)
    finally:
        backend.stop()


def test_a_long_encode_is_answered_before_label_studio_gives_up(ls, tmp_path):
    """The click's image takes 4 s to encode and the deadline is 1 s: Label Studio passes on the backend's
    'still encoding' error (not its own read timeout), /health answers meanwhile, and the next click hits."""
    from slow_engine import SlowEngine

    image, truth = scene()
    engine = SlowEngine(encode_s=4.0)
    settings = Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat,
                                  "SAM_METADATA_DB": str(tmp_path / "sidecar.db"), "SAM_CLICK_DEADLINE_S": "1",
                                  "SAM_PRECOMPUTE_QUEUE": "0"})
    backend = BackendThread(settings, lambda: engine).start()
    try:
        _, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"slow.png": png_bytes(image)}, backend)
        answer = ls.interactive(ml, task, [keypoint(CX, CY)])
        [message] = answer["errors"]
        assert "503" in message and "image still encoding" in message and "click again" in message
        assert requests.get(backend.url + "/health", timeout=5).json()["status"] == "UP"  # while encoding
        deadline = time.monotonic() + 60
        while backend.backend.cache.stats().entries == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        [region] = ls.interactive(ml, task, [keypoint(CX, CY)])["data"]["result"]
        assert iou(region_mask(region), truth) >= 0.8
        assert len(engine.order) == 1 and backend.backend.cache.stats().misses == 1
    finally:
        backend.stop()


def test_backend_restart_between_two_calls(ls, tmp_path):
    image, truth = scene()
    backend = backend_for(ls, tmp_path)
    try:
        _, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"restart.png": png_bytes(image)}, backend)
        first = ls.interactive(ml, task, [keypoint(CX, CY)])
        backend.restart()  # new process state: no /setup, empty caches
        second = ls.interactive(ml, task, [keypoint(CX, CY)])
        assert "errors" not in second, second
        assert iou(region_mask(second["data"]["result"][0]), region_mask(first["data"]["result"][0])) == 1.0
        assert iou(region_mask(second["data"]["result"][0]), truth) >= 0.8
    finally:
        backend.stop()


def test_opening_a_task_precomputes(ls, tmp_path):
    image, _ = scene()
    backend = backend_for(ls, tmp_path)
    try:
        project, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"open.png": png_bytes(image)},
                                            backend)
        # What Label Studio sends when a task is opened: /predict without context.
        body = {"tasks": [ls.task(task)], "label_config": (ROOT / "label_config" / "points-and-boxes-brush.xml")
                .read_text(), "project": f"{project}.0", "params": {"context": None}}
        resp = requests.post(backend.url + "/predict", json=body, timeout=5)
        assert resp.json()["results"] == []
        assert backend.backend.prewarm.wait(30)
        ls.interactive(ml, task, [keypoint(CX, CY)])
        assert backend.backend.cache.stats().misses == 1  # encoded once, in the background
        backend.recorder.flush()
        [row] = Store(tmp_path / "sidecar.db").history(task=task)
        assert row["cache_hit"] is True
    finally:
        backend.stop()


def test_access_token_is_renewed_before_it_expires(ls):
    from sam_backend.labelstudio.auth import LabelStudioAuth

    auth = LabelStudioAuth(ls.pat, requests.Session(), 10.0)
    first = auth.header(ls.url)
    assert auth.header(ls.url) == first  # still valid: no refresh
    auth._expires = 0.0  # as if five minutes had passed
    second = auth.header(ls.url)
    assert second != first and second["Authorization"].startswith("Bearer ")
    assert requests.get(ls.url + "/api/projects/", headers=second, timeout=10).status_code == 200


def test_doctor_from_the_users_side(ls, tmp_path):
    from sam_backend.commands.doctor import run_checks

    image, _ = scene()
    backend = backend_for(ls, tmp_path)
    try:
        project, _, _ = setup_project(ls, "points-and-boxes-brush.xml", {"doctor.png": png_bytes(image)}, backend)
    finally:
        backend.stop()
    settings = Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat, "SAM_ENGINE": "grabcut"})
    checks = list(run_checks(settings, project=project))
    assert [c.name for c in checks] == ["Label Studio", "API key", "task image", "engine"]
    assert all(c.ok for c in checks), [c.line() for c in checks]
    assert "640x480" in checks[2].detail
    bad = Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.legacy_token(),
                             "SAM_CHECKPOINT_DIR": str(tmp_path)})
    lines = {c.name: c for c in run_checks(bad)}
    assert not lines["API key"].ok and "personal access token" in lines["API key"].detail
    assert not lines["checkpoint"].ok and "sam-backend download vit_b" in lines["checkpoint"].detail


def test_export_a_project_read_from_label_studio(ls, tmp_path):
    from pycocotools import mask as mask_utils

    from sam_backend.sidecar.export import ExportOptions, categories_from_config, export, fetch_project

    image, truth = scene()
    backend = backend_for(ls, tmp_path)
    try:
        project, [task], ml = setup_project(ls, "points-and-boxes-brush.xml", {"export.png": png_bytes(image)},
                                            backend)
        [region] = ls.interactive(ml, task, [keypoint(CX, CY)])["data"]["result"]
    finally:
        backend.stop()
    ls.call("POST", f"/api/tasks/{task}/annotations/", json={"result": [region]})
    tasks, config = fetch_project(ls.url, ls.pat, project)
    categories = categories_from_config(config)
    assert categories == ["Object", "Background object"]
    summary = export(tasks, categories, tmp_path / "out", ExportOptions(progress=False, jobs=1))
    assert summary.annotations == 1
    [ann] = json.loads((tmp_path / "out" / "coco.json").read_text())["annotations"]
    seg = ann["segmentation"]
    decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
    assert np.array_equal(decoded, region_mask(region)) and iou(decoded, truth) >= 0.8

    # The same export, evaluated: images come from Label Studio through the backend's loader (PAT).
    from click.testing import CliRunner

    from sam_backend.commands.cli import main

    src = tmp_path / "export.json"
    src.write_text(json.dumps(tasks))
    env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat, "SAM_METADATA_DB": str(tmp_path / "e.db")}
    result = CliRunner(env=env).invoke(main, ["evaluate", str(src), "--engine", "grabcut", "--max-clicks", "3",
                                              "--quiet", "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())["grabcut/clicks"]
    assert evaluated["objects"] == 1 and evaluated["miou"][-1] >= 0.7


def test_precompute_command_warms_the_running_backend(ls, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sam_backend.commands.cli import main

    backend = backend_for(ls, tmp_path)
    try:
        images = {f"pre{i}.png": png_bytes(textured_background(H, W, seed=20 + i)) for i in range(3)}
        project, tasks, ml = setup_project(ls, "points-and-boxes-brush.xml", images, backend)
        monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls.pat)
        result = CliRunner().invoke(main, ["precompute", "--project", str(project), "--backend", backend.url])
        assert result.exit_code == 0, result.output
        assert "precompute: 100%" in result.output and '"queued": 3' in result.output
        misses = backend.backend.cache.stats().misses
        assert backend.backend.cache.stats().entries == 3 and misses == 3
        ls.interactive(ml, tasks[1], [keypoint(CX, CY)])
        assert backend.backend.cache.stats().misses == misses  # the click found its embedding ready
    finally:
        backend.stop()


def test_opening_a_task_prefetches_the_next_unlabeled_tasks(ls, tmp_path):
    """SAM_PREFETCH_NEXT=2: opening task 1 of 5 queues its image and those of the next two unlabeled tasks
    (task 2 is labeled, so tasks 3 and 4), read from the real Label Studio's API; task 5 is not touched."""
    files = {f"pre{i}.png": png_bytes(textured_background(H, W, seed=20 + i)) for i in range(5)}
    settings = Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat, "SAM_ENGINE": "grabcut",
                                  "SAM_METADATA_DB": str(tmp_path / "sidecar.db"), "SAM_PREFETCH_NEXT": "2"})
    backend = BackendThread(settings, GrabCutEngine).start()
    try:
        project, tasks, _ = setup_project(ls, "points-and-boxes-brush.xml", files, backend)
        ls.call("POST", f"/api/tasks/{tasks[1]}/annotations/", json={"result": [], "was_cancelled": False})
        body = {"tasks": [ls.task(tasks[0])], "label_config": (ROOT / "label_config" / "points-and-boxes-brush.xml")
                .read_text(), "project": f"{project}.0", "params": {"context": None}}
        assert requests.post(backend.url + "/predict", json=body, timeout=5).json()["results"] == []
        deadline = time.monotonic() + 60
        metrics = ""
        while time.monotonic() < deadline and 'sam_prefetch_total{result="queued"} 2.0' not in metrics:
            time.sleep(0.2)
            metrics = requests.get(backend.url + "/metrics", timeout=5).text
        assert 'sam_prefetch_total{result="queued"} 2.0' in metrics, metrics[-800:]
        assert backend.backend.prewarm.wait(60)
        encoded = {url.rsplit("-", 1)[-1] for (_, url) in backend.backend.memory.images._memo._data}
        assert encoded == {"pre0.png", "pre2.png", "pre3.png"}
    finally:
        backend.stop()
