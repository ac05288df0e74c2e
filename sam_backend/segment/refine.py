"""Mask clean-up: pure functions over `(H, W) bool` masks in the image's pixel frame.

Areas are in pixels; points are `(N, 2)` pixel `(x, y)`; boxes are pixel `XYXY`. Connectivity is
8-neighbour for the object and 4-neighbour for holes. None of these functions modifies its input.
"""

from __future__ import annotations

import cv2
import numpy as np

from sam_backend.config import RefineSettings
from sam_backend.segment.prompts import ObjectPrompt


def _check(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask: expected (H, W) bool, got {mask.shape} {mask.dtype}")
    return mask


def clamp_to_box(mask: np.ndarray, box: np.ndarray, margin_px: int = 8) -> np.ndarray:
    """Zero everything farther than `margin_px` outside the `XYXY` box."""
    h, w = _check(mask).shape
    x1 = max(0, int(np.floor(box[0])) - margin_px)
    y1 = max(0, int(np.floor(box[1])) - margin_px)
    x2 = min(w, int(np.ceil(box[2])) + margin_px)
    y2 = min(h, int(np.ceil(box[3])) + margin_px)
    out = np.zeros_like(mask)
    out[y1:y2, x1:x2] = mask[y1:y2, x1:x2]
    return out


def _components(mask: np.ndarray, connectivity: int) -> tuple[int, np.ndarray, np.ndarray]:
    pixels = np.ascontiguousarray(mask).view(np.uint8)  # bool → 0/1 bytes without a copy
    n, labels, stats, _ = cv2.connectedComponentsWithStats(pixels, connectivity=connectivity)
    return n, labels, stats


def fill_holes(mask: np.ndarray, max_hole_px: int, keep_open: np.ndarray | None = None) -> np.ndarray:
    """Fill background regions enclosed by the mask whose area is below `max_hole_px`, except holes
    holding a point of `keep_open` (`(N, 2)` pixel x, y: the negative clicks that made them)."""
    if max_hole_px <= 0 or not _check(mask).any():
        return mask.copy()
    n, labels, stats = _components(np.logical_not(mask), 4)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = ~touches_border & (area < max_hole_px)
    fill[0] = False  # label 0 is the mask itself
    for i in _clicked_labels(labels, keep_open):
        fill[i] = False
    out = _set_components(mask, labels, stats, np.flatnonzero(fill), True)
    return out.copy() if out is mask else out


def _clicked_labels(labels: np.ndarray, points: np.ndarray | None) -> set[int]:
    if points is None or len(points) == 0:
        return set()
    h, w = labels.shape
    found = set()
    for x, y in points:
        xi, yi = int(np.clip(x, 0, w - 1)), int(np.clip(y, 0, h - 1))
        if labels[yi, xi] > 0:
            found.add(int(labels[yi, xi]))
    return found


def remove_islands(mask: np.ndarray, min_island_px: int, protect_points: np.ndarray | None = None) -> np.ndarray:
    """Drop components smaller than `min_island_px`, except those holding a point of `protect_points`."""
    if min_island_px <= 0 or not _check(mask).any():
        return mask.copy()
    n, labels, stats = _components(mask, 8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_island_px
    for i in _clicked_labels(labels, protect_points):
        keep[i] = True
    return keep[labels]


def keep_clicked_components(mask: np.ndarray, positive_points: np.ndarray) -> np.ndarray:
    """Keep only the components under a positive click; unchanged where no click lands on the mask."""
    if len(positive_points) == 0 or not _check(mask).any():
        return mask.copy()
    n, labels, _ = _components(mask, 8)
    clicked = _clicked_labels(labels, positive_points)
    if not clicked:
        return mask.copy()
    keep = np.zeros(n, dtype=bool)
    keep[list(clicked)] = True
    return keep[labels]


_FEW = 32  # up to this many components to change: per-component boxes; more: one gather over the image


def _set_components(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, ids: np.ndarray, value: bool
                    ) -> np.ndarray:
    """`mask` with the pixels of components `ids` set to `value` (same result as a gather over `labels`, but
    a few small components cost their bounding boxes only)."""
    if len(ids) == 0:
        return mask
    if len(ids) > _FEW:
        table = np.zeros(len(stats), bool)
        table[ids] = True
        hit = np.take(table, labels)  # faster than `table[labels]`
        return mask | hit if value else mask & ~hit
    out = mask.copy()
    for i in ids:
        x, y, w, h = (int(v) for v in stats[i, :4])
        window = out[y:y + h, x:x + w]
        window[labels[y:y + h, x:x + w] == i] = value
    return out


def _select_components(mask: np.ndarray, positives: np.ndarray, settings: RefineSettings) -> np.ndarray:
    """`remove_islands(keep_clicked_components(mask))` (as `settings` ask) from one labelling: once only the
    clicked components are kept, none of them is an island to drop, so one pass decides both."""
    if not mask.any() or (not settings.keep_clicked and settings.min_island_px <= 0):
        return mask
    n, labels, stats = _components(mask, 8)
    clicked = _clicked_labels(labels, positives)
    keep = np.zeros(n, dtype=bool)
    if settings.keep_clicked and clicked:
        keep[list(clicked)] = True
    elif settings.min_island_px > 0:
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= settings.min_island_px
        keep[list(clicked)] = True
    else:
        return mask
    return _set_components(mask, labels, stats, np.flatnonzero(~keep[1:]) + 1, False)


def refine(mask: np.ndarray, prompt: ObjectPrompt, settings: RefineSettings) -> np.ndarray:
    """Clamp to the box, keep clicked components, drop islands, fill holes (each per `settings`); a hole
    a negative click made is never filled again.

    Everything after the clamp works on the mask's bounding box plus a one-pixel background ring, not the
    whole image: components and enclosed holes are the same there (the ring joins every background region
    that reaches the box's edge to the outside), so the result is identical and costs a fraction.
    """
    out = _check(mask)
    if not settings.enabled:
        return out.copy()
    if prompt.box is not None:
        out = clamp_to_box(out, prompt.box, settings.box_margin_px)
    ys, xs = np.nonzero(out.any(axis=1))[0], np.nonzero(out.any(axis=0))[0]
    if len(ys) == 0:
        return out.copy()
    h, w = out.shape
    y0, y1 = max(0, ys[0] - 1), min(h, ys[-1] + 2)
    x0, x1 = max(0, xs[0] - 1), min(w, xs[-1] + 2)
    crop = out[y0:y1, x0:x1]
    ring = np.zeros((y1 - y0 + 2, x1 - x0 + 2), bool)  # where the box meets the image edge, pad it there too
    ring[1:-1, 1:-1] = crop
    pad_y, pad_x = y0 - 1, x0 - 1

    def local(points: np.ndarray) -> np.ndarray:
        """Points in the padded crop's frame; points outside it are moved onto its background ring."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2) - [pad_x, pad_y]
        outside = (p[:, 0] < 0) | (p[:, 1] < 0) | (p[:, 0] >= ring.shape[1]) | (p[:, 1] >= ring.shape[0])
        p[outside] = 0.0  # the ring's corner: background, on no component and in no hole
        return p

    positives = local(prompt.positive_points)
    ring = _select_components(ring, positives, settings)
    ring = fill_holes(ring, settings.max_hole_px, keep_open=local(prompt.points[prompt.labels == 0]))
    result = np.zeros_like(out)
    result[y0:y1, x0:x1] = ring[1:-1, 1:-1]
    return result
