"""`sam-backend preannotate` and Label Studio's Retrieve Predictions through the real Label Studio 1.23.2: every
rectangle becomes a brush mask with its label, as one prediction per task; a second run adds nothing; bad data is
counted with its task id and never stops the run; people's annotations are never changed.

The engine is GrabCut (a box prompt gives the object on these synthetic scenes; no weights needed); the MobileSAM
run on real photos is in `test_preannotate_mobile_sam`. A loopback proxy in front of Label Studio answers 503 to
the first prediction POST: it stands in for an overloaded Label Studio (the retry is what is under test)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import requests
from conftest import ROOT, closed_loopback_url
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from synthetic import iou, textured_background
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from sam_backend.config import Settings
from sam_backend.labelstudio.client import free_port
from sam_backend.labelstudio.process import LabelStudio
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend

pytestmark = pytest.mark.slow

W, H = 320, 240
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Car"/><Label value="Person"/><Label value="Dog"/>
  </RectangleLabels>
</View>"""
DISCS = [((90, 120), 45), ((235, 110), 50)]


def scene(seed: int) -> tuple[bytes, list[np.ndarray]]:
    image = textured_background(H, W, seed=seed)
    masks = []
    for (cx, cy), r in DISCS:
        m = np.zeros((H, W), np.uint8)
        cv2.circle(m, (cx, cy), r, 1, -1)
        image[m > 0] = (230, 120, 30) if cx < 150 else (40, 70, 220)
        masks.append(m > 0)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue(), masks


def rect(rid: str, label: str, disc: int, rotation: float = 0.0) -> dict:
    (cx, cy), r = DISCS[disc]
    pad = 8
    return {"id": rid, "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "image_rotation": 0,
            "value": {"x": (cx - r - pad) * 100 / W, "y": (cy - r - pad) * 100 / H,
                      "width": (2 * r + 2 * pad) * 100 / W, "height": (2 * r + 2 * pad) * 100 / H,
                      "rotation": rotation, "rectanglelabels": [label]}}


class FlakyProxy:
    """Forwards to Label Studio; the first `fail` POSTs to /api/predictions/ get a 503 (an overloaded server)."""

    def __init__(self, upstream: str, fail: int = 1) -> None:
        self.upstream, self.fail, self.failed = upstream, fail, 0
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def app(self, environ, start_response):  # noqa: ANN001, ANN201 - WSGI
        req = Request(environ)
        if req.method == "POST" and req.path.rstrip("/") == "/api/predictions" and self.failed < self.fail:
            self.failed += 1
            return Response("overloaded", status=503)(environ, start_response)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "content-length")}
        resp = requests.request(req.method, self.upstream + req.full_path.rstrip("?"), headers=headers,
                                data=req.get_data(), timeout=60, allow_redirects=False)
        out = Response(resp.content, status=resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                out.headers[k] = v
        return out(environ, start_response)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with: task A two labeled rectangles (annotation), task B a rectangle with a label the brush
    control lacks and a rotated one, task C a detector's rectangle as a prediction, task D an image that cannot be
    fetched, task E no rectangles."""
    tmp = tmp_path_factory.mktemp("preannotate")
    ls = LabelStudio(tmp / "ls", "pre@example.com", "pre-Passw0rd-1").start()
    try:
        pid = ls.create_project("boxes", CONFIG)
        files, masks = {}, {}
        for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3), ("e.png", 5)):
            files[name], masks[name] = scene(seed)
        ids = ls.upload(pid, files)
        by_name = {ls.task(t)["data"]["image"].rsplit("-", 1)[-1]: t for t in ids}
        missing = closed_loopback_url("missing.png")
        ls.call("POST", f"/api/projects/{pid}/import", json=[{"image": missing}])
        d = next(t["id"] for t in ls.tasks(pid) if t["data"]["image"] == missing)
        a, b, c = by_name["a.png"], by_name["b.png"], by_name["c.png"]
        ls.call("POST", f"/api/tasks/{a}/annotations/", json={"result": [rect("a1", "Car", 0),
                                                                          rect("a2", "Person", 1)]})
        ls.call("POST", f"/api/tasks/{b}/annotations/", json={"result": [rect("b1", "Dog", 0),
                                                                          rect("b2", "Car", 1, rotation=30)]})
        ls.call("POST", "/api/predictions/", json={"task": c, "model_version": "detector-v1", "score": 0.9,
                                                   "result": [rect("c1", "Person", 1)]})
        ls.call("POST", f"/api/tasks/{d}/annotations/", json={"result": [rect("d1", "Car", 0)]})
        yield ls, pid, {"a": a, "b": b, "c": c, "d": d, "e": by_name["e.png"]}, masks
    finally:
        ls.stop()


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[SamBackend, str]]:
    """The backend's real app on a threaded server on 127.0.0.1: `(backend, its URL)`, stopped after."""
    backend = SamBackend(settings)
    port = free_port()
    server = make_server("127.0.0.1", port, create_app(settings, backend=backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield backend, f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def run_preannotate(ls_url: str, pat: str, *args: str) -> dict:
    env = {**os.environ, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": pat, "SAM_ENGINE": "grabcut",
           "SAM_ALLOWED_HOSTS": "127.0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "sam_backend", "preannotate", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pat not in proc.stdout + proc.stderr  # the key never reaches the output
    return json.loads(proc.stdout)


def masks_of(prediction: dict) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for r in prediction["result"]:
        assert r["type"] == "brushlabels" and r["from_name"] == "tag"
        flat = np.array(decode_rle(r["value"]["rle"]), np.uint8).reshape(r["original_height"], r["original_width"], 4)
        out[r["id"]] = (r["value"]["brushlabels"][0], flat[..., 3] > 0)
    return out


def test_preannotate_a_project_then_a_second_run_adds_nothing(project):
    ls, pid, t, masks = project
    annotations_before = {k: ls.task(v)["annotations"] for k, v in t.items()}
    proxy = FlakyProxy(ls.url, fail=1)
    try:
        report = run_preannotate(proxy.url, ls.pat, "--project", str(pid), "--from", "both", "--quiet")
    finally:
        proxy.close()
    assert proxy.failed == 1  # Label Studio answered 503 once and the post was retried
    assert report["model_version"].endswith("/boxes-from-both") and "grabcut" in report["model_version"]
    assert report["tasks"] == 5 and report["predicted"] == 2 and report["without_rectangles"] == 1
    kinds = {(p["task"], p["problem"]) for p in report["problems"]}
    assert kinds == {(t["b"], "label not in brush control"), (t["b"], "rotated rectangle"), (t["d"], "image")}
    assert report["images_per_s"] > 0 and report["encoder_share"] is not None

    mine = [p for p in ls.task(t["a"])["predictions"] if p["model_version"] == report["model_version"]]
    assert len(mine) == 1
    got = masks_of(mine[0])
    assert {k: v[0] for k, v in got.items()} == {"a1-mask": "Car", "a2-mask": "Person"}
    for (_, mask), truth in zip((got["a1-mask"], got["a2-mask"]), masks["a.png"], strict=True):
        assert iou(mask, truth) > 0.85
    [c_pred] = [p for p in ls.task(t["c"])["predictions"] if p["model_version"] == report["model_version"]]
    (label, mask), = masks_of(c_pred).values()
    assert label == "Person" and iou(mask, masks["c.png"][1]) > 0.85
    assert not [p for p in ls.task(t["b"])["predictions"] if p["model_version"] == report["model_version"]]

    again = run_preannotate(ls.url, ls.pat, "--project", str(pid), "--from", "both", "--quiet")
    assert again["predicted"] == 0 and again["skipped_already_predicted"] == 2
    assert len([p for p in ls.task(t["a"])["predictions"] if p["model_version"] == report["model_version"]]) == 1

    first_id = mine[0]["id"]
    replaced = run_preannotate(ls.url, ls.pat, "--project", str(pid), "--from", "both", "--overwrite", "--quiet")
    assert replaced["predicted"] == 2
    now = [p for p in ls.task(t["a"])["predictions"] if p["model_version"] == report["model_version"]]
    assert len(now) == 1 and now[0]["id"] != first_id
    assert {k: ls.task(v)["annotations"] for k, v in t.items()} == annotations_before  # nothing a person drew changed


def test_retrieve_predictions_answers_the_rectangles_masks(project, tmp_path):
    """Data Manager → Retrieve Predictions: Label Studio 1.23.2 posts the selected tasks (with their annotations and
    predictions, no context) to /predict; tasks with rectangles get their masks as one prediction each."""
    ls, pid, t, masks = project
    settings = Settings.from_env({"SAM_ENGINE": "grabcut", "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat,
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    with serving(settings) as (backend, url):
        ls.add_ml_backend(pid, url, interactive=True)
        resp = ls.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                       json={"selectedItems": {"all": False, "included": [t["a"], t["e"]]}})
        assert resp.status_code == 200
    preds = [p for p in ls.task(t["a"])["predictions"] if p["model_version"] == backend.model_version]
    assert len(preds) == 1
    got = masks_of(preds[0])
    assert sorted(v[0] for v in got.values()) == ["Car", "Person"]
    assert max(iou(m, masks["a.png"][0]) for _, m in got.values()) > 0.85


def test_preannotate_a_coco_file(tmp_path):
    """`--coco boxes.json --images DIR -o masks.json`: every usable bbox gets an RLE segmentation of its object;
    a missing image and an empty box are reported with their ids, the rest of the file is kept as it was."""
    from pycocotools import mask as mask_utils

    images = tmp_path / "images"
    images.mkdir()
    png, truth = scene(7)
    (images / "a.png").write_bytes(png)
    boxes = []
    for i, ((cx, cy), r) in enumerate(DISCS):
        boxes.append({"id": 10 + i, "image_id": 1, "category_id": 1 + i, "iscrowd": 0,
                      "bbox": [cx - r - 6, cy - r - 6, 2 * r + 12, 2 * r + 12]})
    boxes.append({"id": 20, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]})
    boxes.append({"id": 30, "image_id": 2, "category_id": 1, "bbox": [5, 5, 50, 50]})
    coco = {"info": {"description": "kept"}, "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                                                        {"id": 2, "file_name": "gone.png", "width": W, "height": H}],
            "annotations": boxes, "categories": [{"id": 1, "name": "left"}, {"id": 2, "name": "right"}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    env = {**os.environ, "SAM_ENGINE": "grabcut"}
    proc = subprocess.run([sys.executable, "-m", "sam_backend", "preannotate", "--coco", str(tmp_path / "boxes.json"),
                           "--images", str(images), "-o", str(tmp_path / "masks.json"), "--quiet"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["masks"] == 2 and {(p["task"], p["problem"]) for p in report["problems"]} == {
        (20, "bad box"), (2, "image")}
    out = json.loads((tmp_path / "masks.json").read_text())
    assert out["info"] == coco["info"] and out["categories"] == coco["categories"]
    by_id = {a["id"]: a for a in out["annotations"]}
    for i, truth_mask in enumerate(truth):
        ann = by_id[10 + i]
        assert ann["bbox"] == boxes[i]["bbox"] and ann["segmentation"]["size"] == [H, W]
        assert iou(mask_utils.decode(ann["segmentation"]) > 0, truth_mask) > 0.85
    assert "segmentation" not in by_id[20] and "segmentation" not in by_id[30]


def test_preannotate_through_a_running_backend(project, tmp_path):
    """`--backend URL`: the same work sent to a running backend (a replica set's nginx in production); the remote
    backend fetches the images from Label Studio itself."""
    ls, pid, t, masks = project
    settings = Settings.from_env({"SAM_ENGINE": "grabcut", "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat,
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    with serving(settings) as (backend, url):
        report = run_preannotate(ls.url, ls.pat, "--project", str(pid), "--backend", url, "--overwrite", "--quiet")
    assert report["model_version"] == f"{backend.model_version}/boxes-from-annotations"
    assert report["predicted"] == 1 and report["masks"] == 2  # task A; C's box is a prediction, not an annotation
    assert {p["problem"] for p in report["problems"]} == {"label not in brush control", "rotated rectangle", "image"}
    assert backend.encoder.total_s > 0  # the remote backend did the encoding
    [pred] = [p for p in ls.task(t["a"])["predictions"] if p["model_version"] == report["model_version"]]
    assert sorted(label for label, _ in masks_of(pred).values()) == ["Car", "Person"]
