"""GrabCut engine (OpenCV): no weights, a real segmentation for machines without a checkpoint.

Seeds: outside the box (or, for clicks without a box, outside a window around them) is definite
background; inside is probable background, with a probable-foreground disk around each positive
click and definite disks at the clicks themselves (foreground for positive, background for
negative). Large images are segmented at `max_side` pixels on the longest side and the mask is
scaled back, which keeps a click under a second on two CPU cores.
"""

from __future__ import annotations

import cv2
import numpy as np

from sam_backend.segment.embedding import Embedding, pack, unpack
from sam_backend.segment.engines import EngineError, MaskPrediction, check_image
from sam_backend.segment.engines.ids import EngineId
from sam_backend.segment.geometry import ImageSize
from sam_backend.segment.prompts import ObjectPrompt


class GrabCutEngine:
    """`Engine` over `cv2.grabCut`; the 'embedding' is the (downscaled) image itself."""

    def __init__(self, max_side: int = 640, iterations: int = 5, window_frac: float = 0.25) -> None:
        self.max_side = max_side
        self.iterations = iterations
        self.window_frac = window_frac
        self.id = EngineId("grabcut", str(max_side), str(iterations))

    @property
    def engine_id(self) -> str:
        return self.id.format()

    def embed(self, image: np.ndarray) -> Embedding:
        """Downscale `(H, W, 3) uint8 RGB` to at most `max_side`; BGR for OpenCV.

        Features: `image` `(h, w, 3) uint8 BGR`; meta `scale` (downscaled / original side).
        """
        check_image(image)
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = image
        if scale < 1.0:
            small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        return Embedding(self.engine_id, ImageSize(w, h), {"image": bgr}, {"scale": scale})

    def predict(
        self, embedding: Embedding, prompt: ObjectPrompt, prev_logits: np.ndarray | None = None
    ) -> MaskPrediction:
        """One mask `(1, H, W) bool`. GrabCut has no confidence: the score is 1.0 for a
        non-empty mask and 0.0 for an empty one. `prev_logits` is ignored."""
        bgr, scale = embedding.features["image"], float(embedding.meta["scale"])
        w, h = embedding.image_size
        sh, sw = bgr.shape[:2]
        points = prompt.points * scale
        labels = prompt.labels
        seeds = np.full((sh, sw), cv2.GC_BGD, dtype=np.uint8)
        stroke = None
        if prompt.stroke is not None:
            stroke = cv2.resize(prompt.stroke.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST) > 0
        if prompt.box is not None:
            x1, y1, x2, y2 = prompt.box * scale
        else:
            pos = points[labels == 1]
            if stroke is not None and stroke.any():
                ys, xs = np.nonzero(stroke)
                pos = np.concatenate([pos, [[xs.min(), ys.min()], [xs.max(), ys.max()]]])
            margin = self.window_frac * max(sh, sw)
            x1, y1 = pos.min(axis=0) - margin
            x2, y2 = pos.max(axis=0) + margin
        x1, y1 = int(max(0, np.floor(x1))), int(max(0, np.floor(y1)))
        x2, y2 = int(min(sw, np.ceil(x2))), int(min(sh, np.ceil(y2)))
        if x2 - x1 < 2 or y2 - y1 < 2:
            return self._empty(h, w)
        seeds[y1:y2, x1:x2] = cv2.GC_PR_FGD if prompt.box is not None else cv2.GC_PR_BGD
        radius = max(2, round(0.01 * max(sh, sw)))
        for (x, y), lab in zip(points, labels, strict=True):
            if lab == 1 and prompt.box is None:
                cv2.circle(seeds, (int(x), int(y)), radius * 4, int(cv2.GC_PR_FGD), -1)
            elif lab == 0:  # the region of like colour around a negative click is probably background
                seeds[self._like_colour(bgr, int(x), int(y))] = cv2.GC_PR_BGD
        for (x, y), lab in zip(points, labels, strict=True):
            cv2.circle(seeds, (int(x), int(y)), radius, int(cv2.GC_FGD if lab == 1 else cv2.GC_BGD), -1)
        if stroke is not None:
            seeds[stroke] = cv2.GC_FGD  # the scribble lies on the object
        if not np.any((seeds == cv2.GC_BGD) | (seeds == cv2.GC_PR_BGD)) or not np.any(
            (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
        ):
            return self._empty(h, w)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        work = seeds.copy()
        cv2.setRNGSeed(0)
        cv2.grabCut(bgr, work, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        small_mask = (work == cv2.GC_FGD) | (work == cv2.GC_PR_FGD)
        mask = small_mask
        if (sh, sw) != (h, w):
            mask = cv2.resize(small_mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR) > 0
        return MaskPrediction(mask[None], np.array([1.0 if mask.any() else 0.0], dtype=np.float32), None)

    def dump(self, embedding: Embedding, compact: bool = False) -> bytes:
        """The downscaled image as bytes (already compact: `uint8`) (see `sam_backend.segment.embedding`)."""
        return pack(embedding, dict(embedding.features))

    def load(self, data: bytes) -> Embedding:
        """An embedding from `dump`."""
        embedding, _ = unpack(data)
        if embedding.engine_id != self.engine_id:
            raise EngineError(f"embedding from {embedding.engine_id} given to {self.engine_id}")
        return embedding

    @staticmethod
    def _like_colour(bgr: np.ndarray, x: int, y: int, tolerance: int = 24) -> np.ndarray:
        """`(h, w) bool`: the pixels connected to (x, y) whose colour is within `tolerance` of the clicked one
        (OpenCV's flood fill), i.e. the surface the negative click landed on."""
        h, w = bgr.shape[:2]
        x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
        filled = np.zeros((h + 2, w + 2), np.uint8)
        blurred = cv2.GaussianBlur(bgr, (5, 5), 0)
        cv2.floodFill(blurred, filled, (x, y), (0, 0, 0), (tolerance,) * 3, (tolerance,) * 3,
                      4 | cv2.FLOODFILL_MASK_ONLY | cv2.FLOODFILL_FIXED_RANGE | (1 << 8))
        return filled[1:-1, 1:-1] > 0

    @staticmethod
    def _empty(h: int, w: int) -> MaskPrediction:
        return MaskPrediction(np.zeros((1, h, w), bool), np.zeros(1, np.float32), None)

