"""Refinement raises IoU on perturbed masks; each step on its own."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import disc_scene, iou, rect_scene

from sam_backend.config import RefineSettings
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.refine import clamp_to_box, fill_holes, keep_clicked_components, refine, remove_islands


def speckle(mask: np.ndarray, n: int, size: int, seed: int = 0) -> np.ndarray:
    """Add `n` small square islands of `size` px away from the object."""
    rng = np.random.default_rng(seed)
    out = mask.copy()
    h, w = mask.shape
    placed = 0
    while placed < n:
        y, x = rng.integers(0, h - size), rng.integers(0, w - size)
        if not mask[max(0, y - 3):y + size + 3, max(0, x - 3):x + size + 3].any():
            out[y:y + size, x:x + size] = True
            placed += 1
    return out


def holes(mask: np.ndarray, n: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = mask.copy()
    ys, xs = np.nonzero(mask)
    for i in rng.choice(len(ys), n, replace=False):
        y, x = ys[i], xs[i]
        if mask[max(0, y - size):y + 2 * size, max(0, x - size):x + 2 * size].all():
            out[y:y + size, x:x + size] = False
    return out


def prompt_for(points=(), labels=(), box=None, size=(320, 240)):
    return ObjectPrompt(np.array(points, np.float32).reshape(-1, 2), np.array(labels), None if box is None else
                        np.array(box, np.float32), "Object", None, None, size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refine_raises_iou_on_speckle_holes_and_leakage(seed):
    _, truth, (x1, y1, x2, y2) = rect_scene(seed=seed)
    noisy = holes(speckle(truth, 12, 5, seed), 6, 4, seed)
    noisy[y1 + 20:y1 + 40, x2:x2 + 60] = True  # leakage out of the box
    p = prompt_for([((x1 + x2) / 2, (y1 + y2) / 2)], [1], box=(x1, y1, x2, y2))
    before, after = iou(noisy, truth), iou(refine(noisy, p, RefineSettings(box_margin_px=0)), truth)
    assert after > before and after >= 0.99


def test_refine_disabled_returns_the_mask():
    _, truth, (cx, cy, _) = disc_scene()
    noisy = speckle(truth, 5, 4)
    out = refine(noisy, prompt_for([(cx, cy)], [1]), RefineSettings(enabled=False))
    assert np.array_equal(out, noisy) and out is not noisy


def test_clamp_keeps_margin():
    mask = np.ones((50, 50), bool)
    out = clamp_to_box(mask, np.array([10, 10, 20, 20]), margin_px=2)
    assert out.sum() == 14 * 14 and out[8, 8] and not out[7, 7]


def test_fill_holes_only_below_threshold_and_not_border_bays():
    mask = np.ones((60, 60), bool)
    mask[10:13, 10:13] = False     # 9 px hole
    mask[30:40, 30:40] = False     # 100 px hole
    mask[0:5, 50:55] = False       # a bay open to the border: not a hole
    out = fill_holes(mask, max_hole_px=50)
    assert out[11, 11] and not out[35, 35] and not out[2, 52]


def test_remove_islands_protects_clicked_component():
    mask = np.zeros((40, 40), bool)
    mask[2:4, 2:4] = True          # 4 px island with a click on it
    mask[30:32, 30:32] = True      # 4 px island without
    mask[10:20, 10:20] = True
    out = remove_islands(mask, 10, protect_points=np.array([[2.5, 2.5]]))
    assert out[3, 3] and not out[31, 31] and out[15, 15]


def test_keep_clicked_components():
    mask = np.zeros((40, 40), bool)
    mask[0:10, 0:10] = True
    mask[20:30, 20:30] = True
    out = keep_clicked_components(mask, np.array([[25.0, 25.0]]))
    assert out[25, 25] and not out[5, 5]
    # A click that misses the mask leaves it alone rather than erasing it.
    assert np.array_equal(keep_clicked_components(mask, np.array([[15.0, 15.0]])), mask)


def test_refine_does_not_modify_its_input():
    _, truth, (cx, cy, _) = disc_scene()
    noisy = speckle(truth, 5, 4)
    copy = noisy.copy()
    refine(noisy, prompt_for([(cx, cy)], [1]), RefineSettings(max_hole_px=256, min_island_px=256, keep_clicked=True))
    assert np.array_equal(noisy, copy)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((2, 4, 4), bool)])
def test_non_bool_or_wrong_rank_is_refused(bad):
    with pytest.raises(ValueError, match=r"\(H, W\) bool"):
        fill_holes(bad, 10)


def test_a_hole_made_by_a_negative_click_is_not_filled_again():
    """Found while making the negative-click server test able to fail: refinement filled the small hole a
    negative click had cut, so the Alt-click had no visible effect."""
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[28:33, 38:43] = False  # a 25 px hole where the negative click landed
    filled = fill_holes(mask, 256)
    kept = fill_holes(mask, 256, keep_open=np.array([[40.0, 30.0]]))
    assert filled[30, 40] and not kept[30, 40] and kept.sum() == mask.sum()
    prompt = ObjectPrompt(np.array([[20.0, 20.0], [40.0, 30.0]]), np.array([1, 0]), None, "a", None, None, (80, 60))
    assert not refine(mask, prompt, RefineSettings(max_hole_px=256))[30, 40]


@pytest.mark.parametrize("seed", range(12))
def test_refine_on_the_masks_box_equals_refine_on_the_whole_image(seed):
    """`refine` works on the mask's bounding box and labels components once (speed); the same steps on the whole
    image, one after the other, are the reference. Sparse specks change a few components (the per-component
    path), dense ones many (the gather path)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = 120, 160
    mask = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 5)):  # blobs, some touching the image edge, some with holes and specks
        cv2.circle(mask, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(4, 40)), 1, -1)
    mask[rng.random((h, w)) > (0.985 if seed < 6 else 0.93)] ^= 1
    mask = mask.astype(bool)
    points = rng.uniform([0, 0], [w, h], size=(int(rng.integers(1, 4)), 2)).astype(np.float32)
    labels = rng.integers(0, 2, len(points))
    labels[0] = 1
    box = np.array([10, 8, 150, 110], np.float32) if seed % 2 else None
    prompt = ObjectPrompt(points, labels, box, "a", None, None, (w, h))
    settings = RefineSettings(max_hole_px=300, min_island_px=30, keep_clicked=seed % 3 != 0)
    ref = clamp_to_box(mask, box, settings.box_margin_px) if box is not None else mask
    if settings.keep_clicked:
        ref = keep_clicked_components(ref, prompt.positive_points)
    ref = remove_islands(ref, settings.min_island_px, protect_points=prompt.positive_points)
    ref = fill_holes(ref, settings.max_hole_px, keep_open=prompt.points[prompt.labels == 0])
    assert np.array_equal(refine(mask, prompt, settings), ref)
