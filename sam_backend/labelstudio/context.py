"""Label Studio interactive context → validated `ObjectPrompt`s in pixel coordinates.

Input frame (Label Studio): every coordinate is a percentage of the image's width or height,
origin top-left; a rectangle is `x, y, width, height` (percent) plus `rotation` in degrees,
clockwise about its top-left corner. A keypoint is `x, y` (percent); its `width` is a stroke
width, not a size.

Output frame: see `sam_backend.segment.prompts`. Pixels are those of the decoded image when its
size is given (percentages are scale-free), else of `original_width × original_height`.

Grouping of several objects in one context: each box together with its points is one object (the
positive points inside it or within `join_margin_px` of it, the negative points wherever they are); each
smart brush stroke is one object (the stroke as a mask prompt plus positive points sampled on it); the
other points form one object per label, in order of first appearance.

Label Studio sends keypoints and rectangles in separate requests, so keypoints that refine a box
drawn earlier arrive without it. `remembered_box(label, newest_point, newest_positive)` (the rule of
`sam_backend.labelstudio.objects` over the backend's object memory) may give that box back: the points that
belong to it then join it as one object, the other positive points are dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from sam_backend.labelstudio.brush import DEFAULT_MAX_PIXELS, BrushError, decode_brush
from sam_backend.labelstudio.geometry import percent_to_pixels
from sam_backend.labelstudio.objects import CurrentObject, owner
from sam_backend.segment.geometry import ImageSize
from sam_backend.segment.prompts import ObjectPrompt, PromptError

POINT_TYPES = ("keypointlabels", "keypoint")
BOX_TYPES = ("rectanglelabels", "rectangle")
BRUSH_TYPES = ("brushlabels", "brush")
STROKE_POINTS = 3  # positive points sampled on a brush stroke
RememberedBox = Callable[[str | None, tuple[float, float], bool], "CurrentObject | None"]
log = logging.getLogger(__name__)
_EPS_PCT = 1e-3  # tolerance for float noise at the image border, in percent


def parse_context(
    context: Mapping[str, Any] | None, image_size: ImageSize | tuple[int, int] | None = None,
    remembered_box: RememberedBox | None = None, join_margin_px: float = 0.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ObjectPrompt]:
    """Turn `params.context` into object prompts.

    `image_size` is the decoded image's `ImageSize(width, height)` in pixels; when omitted, the results'
    `original_width/original_height` are used. An empty or missing context gives `[]`. `remembered_box` and
    `join_margin_px`: see the module docstring. `max_pixels` (SAM_MAX_IMAGE_PIXELS) bounds a brush stroke's
    declared region before it is decoded.
    """
    if context is None:
        return []
    if not isinstance(context, Mapping):
        raise PromptError(f"context: expected an object, got {type(context).__name__}")
    results = context.get("result")
    if results is None:
        return []
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise PromptError(f"context.result: expected a list, got {type(results).__name__}")
    if len(results) == 0:
        return []

    points: list[_Point] = []
    boxes: list[_Box] = []
    strokes: list[_Stroke] = []
    skipped: list[str] = []
    for i, item in enumerate(results):
        where = f"context.result[{i}]"
        if not isinstance(item, Mapping):
            raise PromptError(f"{where}: expected an object, got {type(item).__name__}")
        kind = item.get("type")
        if kind in POINT_TYPES:
            points.append(_parse_point(item, where, image_size))
        elif kind in BOX_TYPES:
            boxes.append(_parse_box(item, where, image_size))
        elif kind in BRUSH_TYPES:
            strokes.append(_parse_stroke(item, where, image_size, max_pixels))
        else:
            skipped.append(repr(kind))
    if not points and not boxes and not strokes:
        raise PromptError(f"context.result: expected keypointlabels, rectanglelabels or brushlabels results, got "
                          f"types {', '.join(skipped)}")
    sizes = {p.size for p in points} | {b.size for b in boxes} | {s.size for s in strokes}
    if len(sizes) > 1:
        raise PromptError(f"context.result: results disagree on the image size: {sorted(sizes)}")
    return _group(points, boxes, remembered_box, join_margin_px) + [_stroke_prompt(s) for s in strokes]


@dataclass
class _Point:
    xy: tuple[float, float]
    positive: bool
    label: str | None
    from_name: str | None
    to_name: str | None
    size: ImageSize


@dataclass
class _Box:
    xyxy: tuple[float, float, float, float]
    label: str | None
    from_name: str | None
    to_name: str | None
    size: ImageSize


@dataclass
class _Stroke:
    mask: np.ndarray  # (H, W) bool in the frame of `size`
    label: str | None
    from_name: str | None
    to_name: str | None
    size: ImageSize


def _image_size(item: Mapping[str, Any], where: str, image_size: ImageSize | None) -> ImageSize:
    dims = []
    for name in ("original_width", "original_height"):
        value = item.get(name)
        if value is None:
            raise PromptError(f"{where}.{name}: missing; Label Studio sends it with every region")
        number = _finite(value, f"{where}.{name}")
        if number <= 0 or number != int(number):
            raise PromptError(f"{where}.{name}: expected a positive integer, got {value!r}")
        dims.append(int(number))
    if image_size is not None:
        return ImageSize(int(image_size[0]), int(image_size[1]))
    return ImageSize(dims[0], dims[1])


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise PromptError(f"{where}: expected a finite number, got {value!r}")
    return number


def _percent(value: Mapping[str, Any], name: str, where: str) -> float:
    if name not in value:
        raise PromptError(f"{where}.value.{name}: missing")
    number = _finite(value[name], f"{where}.value.{name}")
    if not (-_EPS_PCT <= number <= 100 + _EPS_PCT):
        raise PromptError(f"{where}.value.{name}: expected a percentage in 0..100, got {number!r}")
    return min(max(number, 0.0), 100.0)


def _value(item: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise PromptError(f"{where}.value: expected an object, got {type(value).__name__}")
    return value


def _label(value: Mapping[str, Any], key: str, where: str) -> str | None:
    labels = value.get(key, value.get("labels"))
    if labels is None or labels == []:
        return None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise PromptError(f"{where}.value.{key}: expected a list of label names, got {labels!r}")
    return labels[0]


def _name(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    return value if isinstance(value, str) else None


def _parse_point(item: Mapping[str, Any], where: str, image_size: ImageSize | None) -> _Point:
    size = _image_size(item, where, image_size)
    value = _value(item, where)
    x, y = percent_to_pixels((_percent(value, "x", where), _percent(value, "y", where)), size)[0]
    flag = item.get("is_positive", value.get("positive"))
    if flag is None:
        positive = True
    elif isinstance(flag, bool):
        positive = flag
    elif flag in (0, 1):
        positive = bool(flag)
    else:
        raise PromptError(f"{where}.is_positive: expected true or false, got {flag!r}")
    # A click on the last pixel edge (100 %) maps to the last pixel, not past it.
    x = min(float(x), size.width - 0.5)
    y = min(float(y), size.height - 0.5)
    return _Point((x, y), positive, _label(value, "keypointlabels", where), _name(item, "from_name"),
                  _name(item, "to_name"), size)


def _parse_box(item: Mapping[str, Any], where: str, image_size: ImageSize | None) -> _Box:
    size = _image_size(item, where, image_size)
    value = _value(item, where)
    x, y = _percent(value, "x", where), _percent(value, "y", where)
    w, h = _percent(value, "width", where), _percent(value, "height", where)
    rotation = _finite(value.get("rotation", 0) or 0, f"{where}.value.rotation")
    if w <= 0 or h <= 0:
        raise PromptError(f"{where}.value: expected a box of positive width and height, got {w!r} x {h!r} %")
    (x0, y0), (wp, hp) = percent_to_pixels([(x, y), (w, h)], size).tolist()
    theta = math.radians(rotation % 360.0)
    if theta:
        c, s = math.cos(theta), math.sin(theta)
        corners = [(x0 + dx * c - dy * s, y0 + dx * s + dy * c) for dx, dy in ((0, 0), (wp, 0), (wp, hp), (0, hp))]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    else:
        x1, y1, x2, y2 = x0, y0, x0 + wp, y0 + hp
        if x + w > 100 + _EPS_PCT or y + h > 100 + _EPS_PCT:
            raise PromptError(
                f"{where}.value: box reaches past the image: x + width = {x + w:.3f} %, y + height = {y + h:.3f} %"
            )
    x1, x2 = max(0.0, x1), min(float(size.width), x2)
    y1, y2 = max(0.0, y1), min(float(size.height), y2)
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise PromptError(f"{where}.value: box covers less than one pixel: {[x1, y1, x2, y2]}")
    return _Box((x1, y1, x2, y2), _label(value, "rectanglelabels", where), _name(item, "from_name"),
                _name(item, "to_name"), size)


def _parse_stroke(item: Mapping[str, Any], where: str, image_size: ImageSize | None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> _Stroke:
    size = _image_size(item, where, image_size)
    value = _value(item, where)
    rle = value.get("rle")
    if value.get("format", "rle") != "rle" or not isinstance(rle, list) or not all(isinstance(v, int) for v in rle):
        raise PromptError(f"{where}.value.rle: expected Label Studio brush RLE (a list of integers), got "
                          f"{type(rle).__name__}")
    width, height = int(item["original_width"]), int(item["original_height"])
    try:
        mask = decode_brush(rle, width, height, max_pixels)
    except BrushError as exc:
        raise PromptError(f"{where}.value.rle: {exc}") from None
    if (width, height) != tuple(size):
        mask = cv2.resize(mask.astype(np.uint8), tuple(size), interpolation=cv2.INTER_NEAREST) > 0
    if not mask.any():
        raise PromptError(f"{where}.value.rle: the brush stroke is empty")
    return _Stroke(mask, _label(value, "brushlabels", where), _name(item, "from_name"), _name(item, "to_name"), size)


def stroke_points(mask: np.ndarray, n: int = STROKE_POINTS) -> np.ndarray:
    """`(k, 2) float32` pixel (x, y), k ≤ n, spread over a stroke: the point deepest inside it, then each next
    one the stroke pixel farthest from those chosen (so a long scribble gets points along its length)."""
    depth = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    ys, xs = np.nonzero(mask)
    pixels = np.stack([xs, ys], axis=1).astype(np.float32)
    chosen = [int(np.argmax(depth[ys, xs]))]
    nearest = np.linalg.norm(pixels - pixels[chosen[0]], axis=1)
    while len(chosen) < min(n, len(pixels)):
        far = int(np.argmax(nearest))
        if nearest[far] < 4.0:  # a small blot: more points would add nothing
            break
        chosen.append(far)
        nearest = np.minimum(nearest, np.linalg.norm(pixels - pixels[far], axis=1))
    return pixels[chosen] + 0.5  # pixel centres


def _stroke_prompt(stroke: _Stroke) -> ObjectPrompt:
    pts = stroke_points(stroke.mask)
    return ObjectPrompt(pts, np.ones(len(pts), np.int32), None, stroke.label, stroke.from_name, stroke.to_name,
                        stroke.size, stroke.mask)


def _group(points: list[_Point], boxes: list[_Box], remembered_box: RememberedBox | None = None,
           join_margin_px: float = 0.0) -> list[ObjectPrompt]:
    """Objects of one request by the rule of `sam_backend.labelstudio.objects`: each box with the points that belong
    to it; the rest by label, joined to the box `remembered_box` gives for their label and newest point, where it
    gives one. A group of negative points alone is an error only where nothing else in the request can be
    answered; beside other objects it is skipped (logged)."""
    inside: list[list[_Point]] = [[] for _ in boxes]
    loose: dict[str | None, list[_Point]] = {}
    for p in points:
        i = owner(p.xy, p.positive, [b.xyxy for b in boxes], join_margin_px)
        if i is not None:
            inside[i].append(p)
        else:
            loose.setdefault(p.label, []).append(p)
    prompts = [_make(pts, box) for box, pts in zip(boxes, inside, strict=True)]
    negative_only: list[PromptError] = []
    for label, pts in loose.items():
        current = remembered_box(label, pts[-1].xy, pts[-1].positive) if remembered_box is not None else None
        if current is not None:
            x1, y1, x2, y2 = (float(v) for v in current.box)
            first = pts[-1]
            box = _Box((x1, y1, x2, y2), label, first.from_name, first.to_name, first.size)
            prompts.append(_make([p for p in pts if current.takes(p.xy, p.positive)], box))
        elif not any(p.positive for p in pts):
            negative_only.append(PromptError(f"object {label!r} has only negative points ({len(pts)}); add a "
                                             "positive point or a box"))
        else:
            prompts.append(_make(pts, None))
    if negative_only and not prompts:
        raise negative_only[0]
    for skipped in negative_only:
        log.info("skipped a group of points: %s", skipped)
    return prompts


def _make(points: list[_Point], box: _Box | None) -> ObjectPrompt:
    first = box if box is not None else points[0]
    label = box.label if box is not None and box.label is not None else (points[0].label if points else None)
    return ObjectPrompt(
        points=np.array([p.xy for p in points], dtype=np.float32).reshape(-1, 2),
        labels=np.array([1 if p.positive else 0 for p in points], dtype=np.int32),
        box=None if box is None else np.array(box.xyxy, dtype=np.float32),
        label=label,
        from_name=first.from_name,
        to_name=first.to_name,
        image_size=first.size,
    )


def keypoint_result(x: float, y: float, size: ImageSize | tuple[int, int], positive: bool = True,
                    label: str = "Object", from_name: str = "kp", to_name: str = "image") -> dict[str, Any]:
    """A smart keypoint at pixel `(x, y)` of an image of `size` as Label Studio sends it in `context.result`
    (percent of `original_width/height`): what this module parses back into a point."""
    w, h = size
    return {"original_width": w, "original_height": h, "type": "keypointlabels", "from_name": from_name,
            "to_name": to_name, "is_positive": positive,
            "value": {"x": x / w * 100, "y": y / h * 100, "width": 0.3, "keypointlabels": [label]}}
