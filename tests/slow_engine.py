"""A test engine whose encode is slowed on purpose (GrabCut underneath), recording the order of encodes.

Stands in for a large model on a slow CPU: the behaviour under test is scheduling, not masks.
Each test image carries its name's id in pixel (0, 0, 0), so the engine knows which image it encodes.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sam_backend.segment.engines.grabcut import GrabCutEngine


class SlowEngine(GrabCutEngine):
    def __init__(self, encode_s: float) -> None:
        super().__init__()
        self.encode_s = encode_s
        self.order: list[int] = []
        self.started = threading.Event()

    def embed(self, image: np.ndarray):
        self.order.append(int(image[0, 0, 0]))
        self.started.set()
        time.sleep(self.encode_s)
        return super().embed(image)


def tagged_png(tag: int, w: int = 64, h: int = 48) -> bytes:
    """A small PNG whose pixel (0, 0) red value is `tag`, with a disc to click on."""
    rng = np.random.default_rng(tag)
    image = rng.integers(60, 90, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    image[(xx - w // 2) ** 2 + (yy - h // 2) ** 2 < (h // 4) ** 2] = (220, 120, 40)
    image[0, 0, 0] = tag
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_images(root: Path, tags: dict[str, int]) -> None:
    for name, tag in tags.items():
        (root / f"{name}.png").write_bytes(tagged_png(tag))
