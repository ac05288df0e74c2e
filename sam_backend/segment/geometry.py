"""The one image-size convention of the package: `ImageSize(width, height)` in pixels.

Width first, as Pillow, OpenCV's `dsize` and Label Studio's `original_width/original_height` have
it. Numpy arrays are `(H, W, ...)`: build an `ImageSize` from an array with `ImageSize.of(array)`
rather than unpacking `shape` by hand.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ImageSize(NamedTuple):
    """An image's size in pixels, width first."""

    width: int
    height: int

    @classmethod
    def of(cls, array: np.ndarray) -> ImageSize:
        """Size of an `(H, W, ...)` array."""
        return cls(int(array.shape[1]), int(array.shape[0]))

    @property
    def shape(self) -> tuple[int, int]:
        """`(H, W)`, the numpy shape of a mask of this size."""
        return self.height, self.width
