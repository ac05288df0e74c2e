"""The standard click simulator of interactive segmentation (as in the RITM, SAM and SAM 2 evaluations), and the
number-of-clicks arithmetic.

Masks are `(H, W) bool` in image pixels; a click is `(x, y, positive)` at a pixel centre (x + 0.5, y + 0.5).

- First click: the point inside the object farthest from its boundary (the maximum of the distance
  transform of the object, the image border counting as boundary).
- Each next click: in the largest error region, at its point farthest from that region's boundary: positive
  in a missed region (false negative), negative in a false one (false positive); the larger of the two
  distances wins, a tie goes to the missed region.
- Pixels marked ignored (GrabCut's 128 band) count in neither the IoU nor the error regions.
- NoC@t: the number of clicks after which IoU first reaches t; `max_clicks` (and a failure) where it never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

Click = tuple[float, float, bool]


def _deepest(region: np.ndarray) -> tuple[float, tuple[int, int]]:
    """`(distance, (x, y))` of the pixel of `region` farthest from its boundary (image border included)."""
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    if len(rows) == 0:
        return 0.0, (0, 0)
    # On the region's bounding box: nothing of the region lies outside it, so the distances are the same.
    y0, x0 = rows[0], cols[0]
    crop = region[y0:rows[-1] + 1, x0:cols[-1] + 1]
    depth = cv2.distanceTransform(np.pad(crop, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(depth[y, x]), (int(x + x0), int(y + y0))


def first_click(target: np.ndarray) -> Click:
    """The point inside `target` farthest from its boundary, positive."""
    if not target.any():
        raise ValueError("target: an empty mask has no first click")
    _, (x, y) = _deepest(target)
    return x + 0.5, y + 0.5, True


def next_click(prediction: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None) -> Click | None:
    """The corrective click for `prediction` against `target`, or None where they are equal; pixels of `ignore`
    (`(H, W) bool`, e.g. GrabCut's unlabeled band) are errors of neither kind."""
    missed, extra = target & ~prediction, prediction & ~target
    if ignore is not None:
        missed, extra = missed & ~ignore, extra & ~ignore
    d_missed, at_missed = _deepest(missed)
    d_extra, at_extra = _deepest(extra)
    if d_missed == 0.0 and d_extra == 0.0:
        return None
    if d_missed >= d_extra:
        return at_missed[0] + 0.5, at_missed[1] + 0.5, True
    return at_extra[0] + 0.5, at_extra[1] + 0.5, False


def iou(a: np.ndarray, b: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of two bool masks over the pixels not in `ignore`; 1.0 for two empty masks."""
    union, inter = np.logical_or(a, b), np.logical_and(a, b)
    if ignore is not None:
        union, inter = union & ~ignore, inter & ~ignore
    total = union.sum()
    return 1.0 if total == 0 else float(inter.sum() / total)


def noc(ious: Sequence[float], threshold: float, max_clicks: int) -> tuple[int, bool]:
    """`(clicks, reached)`: 1-based number of the first click whose IoU ≥ `threshold`, else `(max_clicks, False)`."""
    for k, value in enumerate(ious[:max_clicks], start=1):
        if value >= threshold:
            return k, True
    return max_clicks, False


def mean_iou_curve(per_object: Sequence[Sequence[float]], max_clicks: int) -> list[float]:
    """mIoU@k for k = 1..max_clicks; an object whose run stopped early (perfect mask) keeps its last IoU."""
    if not per_object:
        return []
    padded = [list(v[:max_clicks]) + [v[-1] if v else 0.0] * (max_clicks - len(v[:max_clicks])) for v in per_object]
    return [float(np.mean([row[k] for row in padded])) for k in range(max_clicks)]
