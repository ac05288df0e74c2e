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
    sam = next(s for k, s in summary.items() if k.startswith("sam/"))
    assert sam["encoder"] == "eager" and sam["decoder"] in ("onnx", "eager")  # the paths the whole run used
    assert (summary["grabcut/clicks"]["encoder"], summary["grabcut/clicks"]["decoder"]) == ("eager", "eager")
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


# -- the standard folder layouts, ignored pixels, refused prompts, the plain predictor beside the product ---------

def _write_layout(root, layout: str, scenes) -> None:
    """The scenes as a dataset folder of `layout` (GrabCut: a 128 band around each object)."""
    images, masks, suffix = {"grabcut": ("data_GT", "boundary_GT", ".bmp"), "berkeley": ("images", "masks", ".png"),
                             "img-gt": ("img", "gt", ".png")}[layout]
    (root / images).mkdir(parents=True)
    (root / masks).mkdir()
    for i, (image, mask, _) in enumerate(scenes):
        stem = f"cat{i:02d}_{1000 + i}"
        cv2.imwrite(str(root / images / f"{stem}.jpg"), image[:, :, ::-1])
        if layout == "grabcut":
            band = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            band &= ~(cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0)
            out = np.where(mask, 255, 0).astype(np.uint8)
            out[band] = 128
        elif layout == "berkeley":
            out = np.repeat(np.where(mask, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2)
        else:
            out = mask.astype(np.uint8)  # 0/1: > 0 is the object
        cv2.imwrite(str(root / masks / f"{stem}{suffix}"), out)


@pytest.mark.parametrize("layout", ["grabcut", "berkeley", "img-gt"])
def test_the_standard_folder_layouts_are_read_in_place(tmp_path, layout):
    from sam_backend.commands.evalsets import image_root, load_objects

    scenes = [disc_scene(seed=0), rect_scene(seed=2)]
    _write_layout(tmp_path / "set", layout, scenes)
    objects = load_objects(tmp_path / "set")
    assert [o.name for o in objects] == ["cat00_1000", "cat01_1001"]
    for obj, (_, mask, _) in zip(objects, scenes, strict=True):
        if layout == "grabcut":  # the band is neither object nor background: ignored
            assert obj.ignore is not None and not (obj.ignore & obj.mask).any()
            assert (obj.mask == (mask & ~obj.ignore)).all() and obj.ignore.sum() > 100
        else:
            assert obj.ignore is None and (obj.mask == mask).all()
    assert (image_root(tmp_path / "set") / objects[0].image).is_file()
    if layout == "img-gt":
        assert objects[0].category == "cat"
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "set"), "--engine", "grabcut", "--max-clicks", "3",
                                       "--quiet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["grabcut/clicks"]["objects"] == 2


def test_a_folder_of_another_layout_is_a_clear_error(tmp_path):
    (tmp_path / "photos").mkdir()
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--engine", "grabcut", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "not a dataset folder" in result.output and "data_GT/ + boundary_GT/" in result.output
    assert "photos/" in result.output


def test_ignored_pixels_stay_out_of_the_iou_and_the_clicks():
    target = np.zeros((40, 40), bool)
    target[10:30, 10:30] = True
    ignore = np.zeros_like(target)
    ignore[8:32, 8:32] = True
    ignore[12:28, 12:28] = False  # a band across the object's edge
    prediction = target.copy()
    prediction[8:32, 8:32] = True  # spills only into the band
    assert iou(prediction, target) < 1.0
    assert iou(prediction, target, ignore) == 1.0
    assert next_click(prediction, target) is not None
    assert next_click(prediction, target, ignore) is None  # no error outside the band: nothing to click


def test_a_refused_prompt_keeps_the_previous_mask_and_is_counted(tmp_path):
    """A negative-only group of points is refused by the backend (422): in-process, `evaluate` gets REFUSED
    instead of a traceback; in a run, the mask on screen stays what it was and summary.json counts it."""
    from sam_backend.commands.evalsets import EvalObject
    from sam_backend.commands.evaluate import (
        CONFIG,
        LABEL,
        REFUSED,
        Configuration,
        in_process_asker,
        run_object,
        summarize,
    )
    from sam_backend.config import Settings
    from sam_backend.labelstudio.context import keypoint_result
    from sam_backend.segment.engines.grabcut import GrabCutEngine

    image, mask, _ = disc_scene(seed=0)
    cv2.imwrite(str(tmp_path / "d.png"), image[:, :, ::-1])
    settings = Settings.from_env({"SAM_ENGINE": "grabcut", "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path)})
    ask = in_process_asker(settings, Configuration("g", GrabCutEngine()), {})
    h, w = mask.shape
    body = {"tasks": [{"id": 1, "data": {"image": "d.png"}}], "label_config": CONFIG,
            "params": {"context": {"result": [keypoint_result(5, 5, (w, h), False, LABEL)]}}}
    assert ask(body) is REFUSED

    answers = iter([None, REFUSED, None])  # stands in for a backend that refuses the 2nd click (as above)

    def scripted(body):
        real = ask(body)
        return REFUSED if next(answers) is REFUSED else real

    target = mask.copy()
    target[:, :40] = True  # a strip the first answer cannot have: a second and third click follow
    run = run_object(scripted, EvalObject("d", "d.png", target, "disc"), 1, "clicks", 3)
    assert run.refused == 1 and len(run.ious) == 3
    assert run.ious[1] == run.ious[0]  # the refused click left the first answer on screen
    assert summarize([run], 3, "clicks")["refused"] == 1


def test_plain_predictor_beside_the_product_in_one_run(synthetic_set, tmp_path, tiny_checkpoint, monkeypatch):
    export, images = synthetic_set
    monkeypatch.setenv("SAM_CHECKPOINT", str(tiny_checkpoint))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(export), "--images", str(images), "--engine", "sam",
                                       "--precision", "fp32", "--plain", "--max-clicks", "2", "--quiet",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    # named after the model found in SAM_CHECKPOINT (the tiny SAM), not SAM_MODEL_TYPE's default
    assert set(summary) == {"sam/custom-64x2@256/fp32/clicks", "sam/custom-64x2@256/fp32/clicks/plain"}
    rows = list(csv.DictReader((out / "per_object.csv").read_text().splitlines()))
    assert {r["configuration"] for r in rows} == set(summary)
    both = CliRunner().invoke(main, ["evaluate", str(export), "--plain", "--backend", "http://127.0.0.1:9",
                                     "-o", str(tmp_path / "o2")])
    assert both.exit_code == 2 and "--plain needs the model in this process" in both.output
