"""Which object a click belongs to: the whole rule, in one place.

Label Studio 1.23.2 sends smart keypoints and smart rectangles in separate requests (a request never mixes them),
so the clicks that correct a box arrive without it; the backend remembers the current object's box per task,
image and label (`serving.memory.ObjectMemory`, for `SAM_OBJECT_MEMORY_TTL_S`). API clients may also send a box
and points in one request. The same rule decides both; `margin` is `SAM_BOX_MARGIN_PX` (what an answer may leak
past its box, and what refinement keeps).

| the click (the newest point of a label's keypoints) | current object (a box) | belongs to |
|---|---|---|
| negative, anywhere | yes | the current object: it removes part of its answer, which may leak past the box |
| positive, inside the box or within the margin | yes | the current object: it adds a missed part |
| positive, on the current object's last answer | yes | the current object (an answer may reach past the margin) |
| positive, elsewhere | yes | a new object of points only; the box is forgotten |
| any | none (no box, expired, other label, `SAM_OBJECT_MEMORY=false`) | a new object of points only |
| a box and points in one request | – | negative points: the nearest box; positive: the box they lie in or near (1) |
| negative points alone, no box | – | refused (422) if nothing else in the request is answered; else skipped |

(1) within the margin; a point several boxes could own goes to the nearest, then the smallest.

When the current object takes keypoints, the negative ones join it wherever they lie and the positive ones only
within the margin or on its answer (a positive point elsewhere is an older object's). A rectangle starts a new
object. When a newer front end sends every rectangle of the control with a new one, only those not answered before
for the task are answered (a repeated request: the newest again).

Coordinates: image pixels, boxes `XYXY`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sam_backend.segment.prompts import ObjectPrompt

Box = Sequence[float]  # x1, y1, x2, y2 in pixels


def distance_to_box(xy: tuple[float, float], box: Box) -> float:
    """Pixels from a point to a box (0 inside it)."""
    dx = max(box[0] - xy[0], 0.0, xy[0] - box[2])
    dy = max(box[1] - xy[1], 0.0, xy[1] - box[3])
    return math.hypot(dx, dy)


def belongs(xy: tuple[float, float], positive: bool, box: Box, margin_px: float) -> bool:
    """Whether a click belongs to the object of `box`: a negative one wherever it lands, a positive one within
    `margin_px` of the box."""
    return not positive or distance_to_box(xy, box) <= margin_px


def owner(xy: tuple[float, float], positive: bool, boxes: Sequence[Box], margin_px: float) -> int | None:
    """Index of the box of one request that a point belongs to (the nearest, then the smallest), or None."""
    owners = [(distance_to_box(xy, b), (b[2] - b[0]) * (b[3] - b[1]), i)
              for i, b in enumerate(boxes) if belongs(xy, positive, b, margin_px)]
    return min(owners)[2] if owners else None


@dataclass(frozen=True)
class CurrentObject:
    """The current object a label's newest click belongs to: its box, and which of the label's points it takes
    (`takes(xy, positive)`: the rule above)."""

    box: np.ndarray
    takes: Callable[[tuple[float, float], bool], bool]


class BoxMemory(Protocol):
    """What the rule needs of the backend's object memory (`serving.memory.ObjectMemory`)."""

    def current_box(self, key: tuple) -> np.ndarray | None: ...

    def on_mask(self, key: tuple, point: tuple[float, float]) -> bool: ...

    def remember_mask(self, key: tuple, mask: np.ndarray) -> None: ...

    def remember_box(self, key: tuple, box: np.ndarray) -> None: ...

    def forget_box(self, key: tuple) -> None: ...

    def rectangle_answered(self, key: tuple) -> bool: ...

    def mark_rectangle(self, key: tuple) -> None: ...


class ObjectRule:
    """The rule applied to one request of one task and image (`where`): the hook that gives the prompt parser the
    current object's box for a label's newest click (`box_for`), the rectangles to answer (`unanswered`), and what
    each answered object leaves for the next click (`answered`)."""

    def __init__(self, objects: BoxMemory, where: tuple, enabled: bool, margin_px: float = 0.0) -> None:
        self.objects, self.where, self.enabled, self.margin_px = objects, where, enabled, margin_px
        self.refined: set[str | None] = set()  # labels whose keypoints joined a remembered box

    def box_for(self, label: str | None, newest: tuple[float, float], positive: bool = True) -> CurrentObject | None:
        """The current object where the newest click belongs to it (its box's time limit starts again); else None,
        and a box there was is forgotten (a new object starts)."""
        if not self.enabled:
            return None
        key = (*self.where, label)
        box = self.objects.current_box(key)
        if box is None:
            return None

        def takes(xy: tuple[float, float], is_positive: bool) -> bool:
            return belongs(xy, is_positive, box, self.margin_px) or self.objects.on_mask(key, xy)

        if not takes(newest, positive):
            self.objects.forget_box(key)
            return None
        self.objects.remember_box(key, box)  # in use
        self.refined.add(label)
        return CurrentObject(box, takes)

    def _rectangle_key(self, prompt: ObjectPrompt) -> tuple:
        return (*self.where, prompt.label, tuple(np.round(prompt.box, 1).tolist()))

    @staticmethod
    def _is_rectangle(prompt: ObjectPrompt) -> bool:
        return prompt.box is not None and len(prompt.points) == 0 and prompt.stroke is None

    def unanswered(self, prompts: list[ObjectPrompt]) -> list[ObjectPrompt]:
        """`prompts` without the rectangles answered before for this task, where the request carries several: the
        new ones, or the newest where none is new. A request with one rectangle is answered as it is."""
        rectangles = [p for p in prompts if self._is_rectangle(p)]
        if len(rectangles) <= 1:
            return prompts
        new = [p for p in rectangles if not self.objects.rectangle_answered(self._rectangle_key(p))] or rectangles[-1:]
        return [p for p in prompts if not self._is_rectangle(p) or any(p is q for q in new)]

    def answered(self, prompt: ObjectPrompt, mask: np.ndarray | None = None) -> None:
        """Remember what `prompt`'s answer (`mask`, `(H, W) bool`) leaves: a rectangle becomes the label's current
        object, its answer the current object's; keypoints that did not join it make the box forgotten."""
        if self._is_rectangle(prompt):
            self.objects.mark_rectangle(self._rectangle_key(prompt))
        if not self.enabled or prompt.stroke is not None:
            return
        key = (*self.where, prompt.label)
        if prompt.box is None:
            self.objects.forget_box(key)  # keypoints outside the box: a new object
            return
        if prompt.label not in self.refined:
            self.objects.remember_box(key, prompt.box)  # a new rectangle: the current object
        if mask is not None:
            self.objects.remember_mask(key, mask)
