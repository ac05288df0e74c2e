"""Label Studio's geometry frame → pixels.

Label Studio stores every coordinate as a percentage of `original_width` / `original_height`,
origin top-left. This is the one place that turns percentages into pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sam_backend.segment.geometry import ImageSize


def percent_to_pixels(points: np.ndarray | Sequence[Sequence[float]] | Sequence[float],
                      size: ImageSize | tuple[int, int]) -> np.ndarray:
    """`(N, 2)` (or one `(2,)`) percent `(x, y)` pairs → `(N, 2) float64` pixels of an image of `size`.

    Also scales extents: a `(width %, height %)` pair gives its size in pixels.
    """
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) / 100.0 * [size[0], size[1]]


def rectangle_to_pixels(value: dict, size: ImageSize | tuple[int, int]) -> tuple[float, float, float, float]:
    """A `rectanglelabels` value (`x, y, width, height` percent, rotation ignored) → pixel `(x, y, w, h)`."""
    (x, y), (w, h) = percent_to_pixels([(value["x"], value["y"]), (value["width"], value["height"])], size).tolist()
    return x, y, w, h
