"""Tiny synthetic scenes with known masks, for quality tests of engines, refinement and export."""

from __future__ import annotations

import cv2
import numpy as np


def textured_background(h: int, w: int, seed: int = 0) -> np.ndarray:
    """`(H, W, 3) uint8 RGB`: greyish blotches plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    low = rng.integers(70, 150, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
    base = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    noise = rng.normal(0, 12, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def disc_scene(h: int = 240, w: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """A saturated orange disc on texture; returns image, `(H, W) bool` mask, `(cx, cy, r)`."""
    image = textured_background(h, w, seed)
    cx, cy, r = int(w * 0.45), int(h * 0.55), int(min(h, w) * 0.22)
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, -1)
    rng = np.random.default_rng(seed + 1)
    colour = np.clip(np.array([230, 120, 30]) + rng.normal(0, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image[mask > 0] = colour[mask > 0]
    return image, mask.astype(bool), (cx, cy, r)


def rect_scene(h: int = 240, w: int = 320, seed: int = 2) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """A blue rectangle on texture; returns image, mask, and its `XYXY` box in pixels."""
    image = textured_background(h, w, seed)
    x1, y1, x2, y2 = int(w * 0.3), int(h * 0.25), int(w * 0.7), int(h * 0.7)
    mask = np.zeros((h, w), bool)
    mask[y1:y2, x1:x2] = True
    rng = np.random.default_rng(seed + 1)
    colour = np.clip(np.array([40, 70, 220]) + rng.normal(0, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image[mask] = colour[mask]
    return image, mask, (x1, y1, x2, y2)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 for two empty masks)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def touching_scene(h: int = 480, w: int = 640, seed: int = 7) -> dict:
    """A disc (the target) with a yellower bar pressed against its right side, both inside a loosely drawn box.
    GrabCut learns the background from outside the box, so the box alone takes the bar in; one negative click
    on the bar teaches it the bar's colour. Returns `image`, `target` mask, `box` XYXY, `negative` (x, y)."""
    image = textured_background(h, w, seed)
    cx, cy, r = 260, 240, 110
    target = np.zeros((h, w), np.uint8)
    cv2.circle(target, (cx, cy), r, 1, -1)
    bar = np.zeros((h, w), np.uint8)
    bar[cy - 90:cy + 90, cx + r - 25:cx + r + 60] = 1
    bar[target > 0] = 0
    rng = np.random.default_rng(seed + 1)
    for mask, rgb in ((target, (225, 125, 35)), (bar, (235, 185, 40))):
        colour = np.clip(np.array(rgb) + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
        image[mask > 0] = colour[mask > 0]
    box = (cx - r - 12, cy - r - 12, cx + r + 72, cy + r + 12)
    return {"image": image, "target": target.astype(bool), "box": box, "negative": (cx + r + 30, cy)}
