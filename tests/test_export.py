"""Exporter: brush RLE → COCO RLE exactly, polygons, PNG masks, crops, YOLO-seg, ZIP, bad input."""

from __future__ import annotations

import json
import zipfile

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from lsexport import CATEGORIES, CONFIG, brush, keypoint, polygon, rectangle, task, tricky_masks
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from synthetic import iou

from sam_backend.commands.cli import main
from sam_backend.config import Settings
from sam_backend.sidecar.export import ExportError, ExportOptions, categories_from_config, export, load_tasks


def run(tasks, tmp_path, **opts):
    out = tmp_path / "out"
    options = ExportOptions(progress=False, jobs=opts.pop("jobs", 1), **opts)
    summary = export(tasks, CATEGORIES, out, options, fetch_settings=opts.get("settings"))
    return out, json.loads((out / "coco.json").read_text()), summary


def test_categories_follow_the_config_order():
    assert categories_from_config(CONFIG) == CATEGORIES


@pytest.mark.parametrize("jobs", [1, 2])
def test_brush_masks_round_trip_exactly(tmp_path, jobs):
    originals = {}
    tasks = []
    for i in range(12):  # enough tasks for the process pool
        mask = tricky_masks()[i % 3]
        originals[i + 1] = mask
        tasks.append(task(i + 1, [brush(mask, "Cat" if i % 2 else "Dog", f"r{i}")]))
    out, coco, summary = run(tasks, tmp_path, jobs=jobs)
    assert summary.annotations == len(tasks) and summary.images == len(tasks)
    for ann in coco["annotations"]:
        original = originals[ann["image_id"]]
        seg = ann["segmentation"]
        decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        assert np.array_equal(decoded, original)
        assert ann["area"] == original.sum()
        ys, xs = np.nonzero(original)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_coco_loads_and_evaluates_to_ap_1(tmp_path):
    tasks = [task(i + 1, [brush(m, "Cat", f"r{i}")]) for i, m in enumerate(tricky_masks())]
    out, coco, _ = run(tasks, tmp_path)
    gt = COCO(str(out / "coco.json"))
    dets = [dict(a, score=1.0) for a in coco["annotations"]]
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_polygons_on_hole_free_shapes_and_a_warning_for_holes(tmp_path):
    ring, parts, corner = tricky_masks()
    tasks = [task(1, [brush(parts, "Cat", "a")]), task(2, [brush(corner, "Dog", "b")]),
             task(3, [brush(ring, "Cat", "c")])]
    out, coco, summary = run(tasks, tmp_path, polygons=True)
    for ann, original in zip(coco["annotations"][:2], (parts, corner), strict=True):
        assert isinstance(ann["segmentation"], list) and len(ann["segmentation"]) >= 1
        rles = mask_utils.frPyObjects(ann["segmentation"], 120, 160)
        assert iou(mask_utils.decode(mask_utils.merge(rles)).astype(bool), original) >= 0.98
    assert len(coco["annotations"][0]["segmentation"]) == 2  # two components, two polygons
    # The ring: one polygon, its outer edge; the hole is filled (and said so).
    [outer] = coco["annotations"][2]["segmentation"]
    filled = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([outer], 120, 160))).astype(bool)
    disc = np.zeros((120, 160), np.uint8)
    cv2.circle(disc, (50, 60), 35, 1, -1)
    assert iou(filled, disc.astype(bool)) >= 0.98 and filled[60, 50]  # the hole's centre is inside
    assert summary.holes_lost == 1
    assert [w for w in summary.warnings if "holes dropped by" in w] == [
        "task 3, annotation 30, region c: holes dropped by --polygons (use RLE to keep them)"]


def test_yolo_seg_warns_where_a_hole_is_lost(tmp_path):
    ring, parts, _ = tricky_masks()
    out, _, summary = run([task(1, [brush(ring, "Cat", "r"), brush(parts, "Dog", "p")])], tmp_path)
    assert [w for w in summary.warnings if "YOLO" in w] == [
        "task 1, annotation 10, region r: holes dropped in YOLO-seg (its polygons cannot hold them)"]
    assert len((out / "yolo" / "labels" / "abc00001-img1.txt").read_text().splitlines()) == 3


def test_polygon_rectangle_and_keypoint_regions(tmp_path):
    pts = [(20, 20), (80, 25), (60, 90), (15, 70)]
    tasks = [task(1, [polygon(pts, "Bird", "p"), rectangle(10, 10, 50, 40, "r"), keypoint(30, 40, "k")])]
    out, coco, summary = run(tasks, tmp_path)
    poly, box, kp = coco["annotations"]
    assert [a["category_id"] for a in coco["annotations"]] == [3, 1, 4]
    assert poly["area"] > 0 and isinstance(poly["segmentation"], dict)
    assert box["segmentation"] == [] and box["bbox"] == pytest.approx([10, 10, 50, 40])
    assert box["area"] == pytest.approx(2000)
    assert kp["keypoints"] == pytest.approx([30, 40, 2]) and kp["num_keypoints"] == 1
    assert summary.by_type == {"polygonlabels": 1, "rectanglelabels": 1, "keypointlabels": 1}


def test_png_masks_instance_and_semantic(tmp_path):
    ring, parts, _ = tricky_masks()
    out, coco, _ = run([task(7, [brush(ring, "Dog", "a"), brush(parts, "Cat", "b")])], tmp_path)
    masks = out / "masks"
    one = cv2.imread(str(masks / "7_abc00007-img7_1_Dog.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(one > 0, ring)
    inst = cv2.imread(str(masks / "7_abc00007-img7_instances.png"), cv2.IMREAD_UNCHANGED)
    sem = cv2.imread(str(masks / "7_abc00007-img7_semantic.png"), cv2.IMREAD_UNCHANGED)
    assert inst.dtype == np.uint16 and set(np.unique(inst)) == {0, 1, 2}
    assert np.array_equal(inst == 1, ring & ~parts) and np.array_equal(sem == 1, parts)
    assert coco["images"] == [{"id": 7, "file_name": "abc00007-img7.png", "width": 160, "height": 120}]


def test_yolo_lines_parse_and_map_back_within_one_pixel(tmp_path):
    _, parts, corner = tricky_masks()
    out, coco, _ = run([task(1, [brush(parts, "Dog", "a"), brush(corner, "Cat", "b")])], tmp_path)
    lines = (out / "yolo" / "labels" / "abc00001-img1.txt").read_text().splitlines()
    assert len(lines) == 3  # two components of `parts`, one of `corner`
    union = parts | corner
    contours, _ = cv2.findContours(union.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    for line in lines:
        cls, *coords = line.split()
        assert int(cls) in (0, 1) and len(coords) % 2 == 0 and all(0 <= float(v) <= 1 for v in coords)
        xy = np.array(coords, float).reshape(-1, 2) * [160, 120]
        for x, y in xy:
            d = max(cv2.pointPolygonTest(c, (float(x), float(y)), True) for c in contours)
            assert abs(d) <= 1.0
    data = (out / "yolo" / "data.yaml").read_text()
    assert "nc: 4" in data and '0: "Cat"' in data


def test_crops_use_local_images_and_unreachable_ones_are_counted(tmp_path):
    ring, _, _ = tricky_masks()
    image = np.full((120, 160, 3), 200, np.uint8)
    image[ring] = (10, 20, 30)
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), image[:, :, ::-1])
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path / "imgs")})
    tasks = [task(1, [brush(ring, "Cat", "a")], image="/data/local-files/?d=a.png"),
             task(2, [brush(ring, "Cat", "b")], image="/data/local-files/?d=missing.png")]
    out = tmp_path / "out"
    summary = export(tasks, CATEGORIES, out, ExportOptions(crops=True, progress=False, jobs=1), fetch_settings=settings)
    assert summary.crops == 1 and summary.images_unreachable == 1 and summary.annotations == 2
    crop = cv2.imread(str(out / "crops" / "1_a_1_Cat.png"), cv2.IMREAD_UNCHANGED)
    ys, xs = np.nonzero(ring)
    assert crop.shape == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, 4)
    alpha = crop[:, :, 3] > 0
    assert np.array_equal(alpha, ring[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    assert (crop[alpha][:, :3] == (30, 20, 10)).all()  # BGR on disk


def test_newest_non_cancelled_annotation_is_used(tmp_path):
    ring, parts, corner = tricky_masks()
    # Task 1: a newer annotation that was cancelled (skipped) is passed over.
    skipped = task(1, [brush(ring, "Cat", "a")], cancelled_extra=True)
    skipped["annotations"][1]["result"] = [brush(corner, "Dog", "x")]
    # Task 2: two live annotations; only the newer one (parts, by updated_at) is exported.
    both = task(2, [brush(ring, "Cat", "old")])
    both["annotations"].append({"id": 99, "result": [brush(parts, "Dog", "new")], "was_cancelled": False,
                                "created_at": "2026-11-26T09:00:00Z", "updated_at": "2026-11-27T09:00:00Z"})
    _, coco, _ = run([skipped, both], tmp_path)
    by_image = {a["image_id"]: a for a in coco["annotations"]}
    assert len(coco["annotations"]) == 2 and set(by_image) == {1, 2}
    decode = lambda seg: mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)  # noqa: E731
    assert np.array_equal(decode(by_image[1]["segmentation"]), ring) and by_image[1]["category_id"] == 1
    assert np.array_equal(decode(by_image[2]["segmentation"]), parts) and by_image[2]["category_id"] == 2
    assert by_image[2]["attributes"]["ls_annotation"] == 99


@pytest.mark.parametrize("content", [b'[{"id": 1, "data": {"image": "x"}, "annotations": [{"result": [', b"\xff\xfe",
                                     b'{"not": "tasks"}', b"[1, 2]"])
def test_corrupt_input_gives_a_clear_error_and_no_output(tmp_path, content):
    src = tmp_path / "export.json"
    src.write_bytes(content)
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "export.json" in result.output
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["export.json"]


def test_bad_region_fails_whole_export_leaving_nothing(tmp_path):
    ring, _, _ = tricky_masks()
    bad = brush(ring, "Cat", "bad")
    bad["original_width"] = 200  # RLE no longer fits
    bad_task = task(2, [bad])
    for r in bad_task["annotations"][0]["result"]:
        r["original_height"] = 120
    with pytest.raises(ExportError, match="task 2.*region bad"):
        export([task(1, [brush(ring, "Cat", "a")]), bad_task], CATEGORIES, tmp_path / "out",
               ExportOptions(progress=False, jobs=1))
    assert list(tmp_path.iterdir()) == []


def test_cli_zip_and_progress(tmp_path):
    ring, parts, _ = tricky_masks()
    src = tmp_path / "export.json"
    src.write_text(json.dumps([task(i, [brush(ring, "Cat", "a"), brush(parts, "Dog", "b")]) for i in range(1, 4)]))
    cfg = tmp_path / "config.xml"
    cfg.write_text(CONFIG)
    result = CliRunner().invoke(main, ["export", str(src), "--config", str(cfg), "-o", str(tmp_path / "ds.zip")])
    assert result.exit_code == 0, result.output
    assert "export: 100%" in result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["annotations"] == 6
    with zipfile.ZipFile(tmp_path / "ds.zip") as zf:
        names = set(zf.namelist())
        assert {"coco.json", "yolo/data.yaml", "masks/1_abc00001-img1_instances.png"} <= names
        coco = json.loads(zf.read("coco.json"))
    assert [c["name"] for c in coco["categories"]] == CATEGORIES
    again = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "ds.zip")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_load_tasks_accepts_a_real_export_shape_and_refuses_a_broken_one(tmp_path):
    ring, _, _ = tricky_masks()
    tasks = [task(1, [brush(ring, "Cat", "a")]), task(2, [])]
    tasks[0].update(predictions=[], drafts=[], meta={}, file_upload="abc00001-img1.png")  # fields LS adds
    src = tmp_path / "e.json"
    src.write_text(json.dumps(tasks))
    assert load_tasks(src) == tasks  # read as it is, nothing dropped or renamed
    src.write_text(json.dumps(tasks[0]))
    assert load_tasks(src) == [tasks[0]]  # one task object (the API's shape) is a list of one
    broken = dict(tasks[1], annotations={"result": []})
    src.write_text(json.dumps([tasks[0], broken]))
    with pytest.raises(ExportError, match="task 2: 'annotations' must be a list"):
        load_tasks(src)
