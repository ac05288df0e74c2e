"""A synthetic image and a table of prompts on it: for timings (`sam-backend bench`, `doctor`) and for the
check that a fast decoder gives the eager decoder's masks. The masks they give mean nothing; their cost does.
`check_images`: the photos a fast encoder or decoder is checked on (`SAM_CHECK_IMAGES`), else the synthetic image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sam_backend.segment.prompts import ObjectPrompt


def bench_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """`(H, W, 3) uint8 RGB`: smooth noise with a few filled shapes (objects to click on)."""
    import cv2

    rng = np.random.default_rng(seed)
    low = rng.integers(40, 200, size=(max(2, height // 32), max(2, width // 32), 3)).astype(np.uint8)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    cv2.circle(image, (width // 3, height // 2), height // 6, (230, 120, 30), -1)
    cv2.rectangle(image, (width // 2, height // 4), (width * 4 // 5, height * 3 // 4), (40, 70, 220), -1)
    return image


CHECK_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def check_images(folder: Path | None, limit: int = 3) -> list[np.ndarray]:
    """`(H, W, 3) uint8 RGB` images the fast paths are checked on: up to `limit` photos of `folder` (sorted by
    name), else the synthetic sample image (`bench_image`, 1024 × 768)."""
    images: list[np.ndarray] = []
    if folder is not None and folder.is_dir():
        from PIL import Image

        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in CHECK_IMAGE_SUFFIXES)[:limit]:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
    return images or [bench_image(1024, 768)]


def bench_prompts(width: int, height: int) -> list[ObjectPrompt]:
    """Five prompts: one click, two clicks, a click and a negative click, a box, a box with a click."""
    size = (width, height)
    c = (width / 3, height / 2)
    r = ((width / 2 + width * 4 / 5) / 2, height / 2)
    box = np.array([width / 2 - 10, height / 4 - 10, width * 4 / 5 + 10, height * 3 / 4 + 10], np.float32)
    mk = ObjectPrompt
    return [
        mk(np.array([c]), np.array([1]), None, "a", None, None, size),
        mk(np.array([c, (c[0] + 20, c[1] + 15)]), np.array([1, 1]), None, "a", None, None, size),
        mk(np.array([r, (r[0], height * 0.15)]), np.array([1, 0]), None, "b", None, None, size),
        mk(np.zeros((0, 2)), np.zeros(0), box, "b", None, None, size),
        mk(np.array([r]), np.array([1]), box, "b", None, None, size),
    ]
