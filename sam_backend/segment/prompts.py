"""One object to segment, in pixels: the prompt every engine takes.

Frame (SAM's): `ObjectPrompt.points` is `(N, 2) float32` pixel `(x, y)`, `labels` is `(N,) int32`
with 1 = positive and 0 = negative, `box` is `(4,) float32` pixel `XYXY` or None, `stroke` an `(H, W)
bool` scribble over the object (a smart brush stroke) or None, all in the frame of an image of
`image_size` (`ImageSize(width, height)`). Label Studio's percent frame is turned
into this one by `sam_backend.labelstudio.context`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_backend.segment.geometry import ImageSize


class PromptError(ValueError):
    """The context cannot be turned into a prompt; the message names the field and the value."""


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to segment, in the pixel frame of an image `image_size = (width, height)`."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    label: str | None
    from_name: str | None
    to_name: str | None
    image_size: ImageSize
    stroke: np.ndarray | None = None

    def __post_init__(self) -> None:
        points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        if len(points) != len(labels):
            raise PromptError(f"points and labels differ in length: {len(points)} points, {len(labels)} labels")
        if np.any((labels != 0) & (labels != 1)):
            raise PromptError(f"labels: expected 0 (negative) or 1 (positive), got {sorted(set(labels.tolist()))}")
        box = None if self.box is None else np.asarray(self.box, dtype=np.float32).reshape(4)
        if box is None and len(points) == 0:
            raise PromptError("an object needs at least one point or a box, got neither")
        if box is None and not np.any(labels == 1):
            raise PromptError(
                f"object {self.label!r} has only negative points ({len(points)}); "
                "add a positive point or a box"
            )
        if box is not None and not (box[2] > box[0] and box[3] > box[1]):
            raise PromptError(f"box: expected x1 < x2 and y1 < y2 in pixels, got {box.tolist()}")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "image_size", ImageSize(*self.image_size))
        if self.stroke is not None:
            stroke = np.asarray(self.stroke, dtype=bool)
            if stroke.shape != self.image_size.shape:
                raise PromptError(f"stroke: expected a {self.image_size.shape} mask, got {stroke.shape}")
            object.__setattr__(self, "stroke", stroke)

    @property
    def positive_points(self) -> np.ndarray:
        """`(P, 2) float32` pixel (x, y) of the positive clicks."""
        return self.points[self.labels == 1]

    def clicks_missed(self, mask: np.ndarray) -> int:
        """How many points an `(H, W) bool` mask of this image disagrees with: a positive point outside it or a
        negative point inside it (the pixel under each point)."""
        if len(self.points) == 0:
            return 0
        h, w = mask.shape
        xs = np.clip(self.points[:, 0].astype(np.int64), 0, w - 1)
        ys = np.clip(self.points[:, 1].astype(np.int64), 0, h - 1)
        return int(np.count_nonzero(mask[ys, xs] != (self.labels == 1)))

    def key(self) -> tuple:
        """A hashable identity of the prompt's geometry (rounded to 0.1 px), for logits memory."""
        box = None if self.box is None else tuple(np.round(self.box, 1).tolist())
        pts = tuple(map(tuple, np.round(self.points, 1).tolist()))
        stroke = None if self.stroke is None else hashlib.sha256(np.packbits(self.stroke).tobytes()).hexdigest()[:16]
        return (self.label, box, pts, tuple(self.labels.tolist()), stroke)

    def without_last_point(self) -> ObjectPrompt | None:
        """The same object before its newest point was added, or None where that leaves nothing valid."""
        if len(self.points) == 0:
            return None
        try:
            return ObjectPrompt(
                self.points[:-1], self.labels[:-1], self.box, self.label, self.from_name, self.to_name,
                self.image_size, self.stroke,
            )
        except PromptError:
            return None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form: points `[[x, y, label], ...]` and box `[x1, y1, x2, y2]` in pixels."""
        return {
            "points": [[float(x), float(y), int(lab)] for (x, y), lab in zip(self.points, self.labels, strict=True)],
            "box": None if self.box is None else [float(v) for v in self.box],
            "label": self.label,
            "from_name": self.from_name,
            "image_size": list(self.image_size),
            "stroke_px": None if self.stroke is None else int(self.stroke.sum()),
        }
