"""`sam-backend evaluate`: the click simulator on small known masks, the NoC/mIoU arithmetic, and end-to-end runs
(GrabCut and the tiny SAM in one run) whose outputs obey the obvious laws."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from lsexport import brush
from synthetic import disc_scene, rect_scene

from sam_backend.commands.cli import main
from sam_backend.segment.simulator import first_click, iou, mean_iou_curve, next_click, noc


def test_first_click_lands_at_the_deepest_point():
    m = np.zeros((30, 40), bool)
    m[5:25, 10:30] = True  # 20 x 20 square: centre (20, 15)
    x, y, positive = first_click(m)
    assert positive and 19 <= x <= 21 and 14 <= y <= 16
    ring = np.zeros((60, 60), np.uint8)
    cv2.circle(ring, (30, 30), 25, 1, -1)
    cv2.circle(ring, (30, 30), 10, 0, -1)
    x, y, _ = first_click(ring.astype(bool))
    assert ring[int(y), int(x)] and 15 <= np.hypot(x - 30, y - 30) <= 22  # inside the ring, not in its hole


def test_next_click_sign_follows_the_larger_error():
    target = np.zeros((40, 60), bool)
    target[10:30, 10:50] = True
    missed = target.copy()
    missed[10:30, 30:50] = False  # the right half is missing
    x, y, positive = next_click(missed, target)
    assert positive and 30 <= x <= 50 and target[int(y), int(x)] and not missed[int(y), int(x)]
    extra = target.copy()
    extra[0:40, 50:60] = True  # a false strip on the right
    x, y, positive = next_click(extra, target)
    assert not positive and x >= 50
    assert next_click(target, target) is None


def test_noc_and_miou_arithmetic():
    assert noc([0.5, 0.86, 0.91], 0.85, 20) == (2, True)
    assert noc([0.5, 0.86, 0.91], 0.90, 20) == (3, True)
    assert noc([0.5, 0.6], 0.9, 20) == (20, False)
    assert noc([0.95], 0.9, 20) == (1, True)
    curve = mean_iou_curve([[0.5, 0.7, 0.9], [0.2, 1.0]], 4)
    assert curve == pytest.approx([0.35, 0.85, 0.95, 0.95])  # a finished run keeps its last IoU
    assert iou(np.ones((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


@pytest.fixture()
def synthetic_set(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    tasks = []
    scenes = [disc_scene(seed=0), rect_scene(seed=2), disc_scene(seed=5)]
    for i, (image, mask, _) in enumerate(scenes, start=1):
        cv2.imwrite(str(images / f"s{i}.png"), image[:, :, ::-1])
        tasks.append({"id": i, "data": {"image": f"/data/upload/1/s{i}.png"},
                      "annotations": [{"id": i, "result": [brush(mask, "Cat", f"r{i}")], "was_cancelled": False}]})
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    return export, images


def test_evaluate_grabcut_and_tiny_sam_in_one_run(synthetic_set, tmp_path, tiny_checkpoint, monkeypatch):
    export, images = synthetic_set
    monkeypatch.setenv("SAM_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("SAM_DEVICE", "cpu")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(export), "--images", str(images), "--engine", "grabcut",
                                       "--engine", "sam", "--max-clicks", "5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"grabcut/clicks", next(k for k in summary if k.startswith("sam/"))}
    for s in summary.values():
        assert s["objects"] == 3 and len(s["miou"]) == 5 and 1 <= s["noc85"] <= 5 and 1 <= s["noc90"] <= 5
        assert all(0.0 <= v <= 1.0 for v in s["miou"]) and s["seconds_per_click"] > 0
    grabcut = summary["grabcut/clicks"]["miou"]
    assert all(b >= a - 1e-9 for a, b in zip(grabcut, grabcut[1:], strict=False)), grabcut  # never decreases
    assert grabcut[-1] >= 0.85  # GrabCut reaches the synthetic objects
    with open(out / "per_object.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(1 <= int(r["noc90"]) <= 5 for r in rows)
    png = (out / "miou_vs_clicks.png").read_bytes()
    picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and picture.shape[0] > 300
    assert "evaluate: 100%" in result.output  # the progress bar


def test_the_box_protocol_starts_with_the_box_and_memory_joins_the_clicks(synthetic_set, tmp_path):
    export, images = synthetic_set
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(export), "--images", str(images), "--engine", "grabcut",
                                       "--protocol", "both", "--no-refine", "--max-clicks", "3", "--quiet",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    box = summary["grabcut/box/no-refine"]
    assert box["box_iou"] is not None and box["box_iou"] == box["miou"][0] and box["box_iou"] >= 0.8
    assert summary["grabcut/clicks/no-refine"]["box_iou"] is None


def test_a_coco_file_with_polygons_and_rle(tmp_path):
    from pycocotools import mask as mask_utils

    image, mask, _ = disc_scene()
    cv2.imwrite(str(tmp_path / "a.png"), image[:, :, ::-1])
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 320, "height": 240}],
            "categories": [{"id": 1, "name": "disc"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
                            {"id": 2, "image_id": 1, "category_id": 1,
                             "segmentation": [contours[0].ravel().astype(float).tolist()]}]}
    src = tmp_path / "coco.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(src), "--images", str(tmp_path), "--engine", "grabcut",
                                       "--max-clicks", "2", "--quiet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["grabcut/clicks"]["objects"] == 2


def test_data_without_masks_is_a_clear_error(tmp_path):
    src = tmp_path / "e.json"
    src.write_text(json.dumps([{"id": 1, "data": {"image": "x.png"}, "annotations": []}]))
    result = CliRunner().invoke(main, ["evaluate", str(src), "--engine", "grabcut", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no object with a mask" in result.output


def test_the_deepest_point_on_the_regions_box_equals_the_whole_image():
    from sam_backend.segment import simulator

    rng = np.random.default_rng(1)
    for _ in range(20):
        region = np.zeros((90, 120), np.uint8)
        cv2.ellipse(region, (int(rng.integers(0, 120)), int(rng.integers(0, 90))),
                    (int(rng.integers(3, 40)), int(rng.integers(3, 30))), float(rng.integers(0, 180)), 0, 360, 1, -1)
        region = region.astype(bool)
        full = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(full)), full.shape)
        depth, point = simulator._deepest(region)
        assert point == (int(x), int(y)) and depth == pytest.approx(float(full[y, x]), abs=1e-4)
