"""A mask → the Label Studio result dict that shows it: a `brushlabels` RLE or a `polygonlabels` outline.

Frames: the mask is `(H, W) bool` in the decoded image's pixels; a polygon's points go out in
Label Studio's percent of `original_width/original_height`; brush RLE is row-major RGBA (see
`sam_backend.labelstudio.brush`).
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from sam_backend.labelstudio.brush import encode_brush
from sam_backend.labelstudio.labelconfig import TargetControls
from sam_backend.segment.geometry import ImageSize
from sam_backend.segment.masks import mask_to_polygons, polygon_area


def mask_to_brush(mask: np.ndarray) -> list[int]:
    """`(H, W) bool` → Label Studio brush RLE (row-major RGBA); byte-identical to label-studio-sdk's
    `mask2rle`, vectorised (see `sam_backend.labelstudio.brush` for why)."""
    return encode_brush(mask)


def mask_to_polygon(mask: np.ndarray, tolerance_px: float = 1.0) -> list[list[float]]:
    """Outer contour of the largest component, simplified, on pixel edges, as Label Studio percent `[[x, y], ...]`."""
    h, w = mask.shape
    polygons, _ = mask_to_polygons(mask, tolerance_px)
    if not polygons:
        return []
    largest = np.asarray(max(polygons, key=polygon_area)).reshape(-1, 2)
    return [[float(x) / w * 100.0, float(y) / h * 100.0] for x, y in largest]


def mask_result(mask: np.ndarray, label: str | None, score: float, target: TargetControls) -> dict[str, Any] | None:
    """One region for `target`'s output control showing `mask`; None for an empty mask or outline."""
    if not mask.any():
        return None
    size = ImageSize.of(mask)
    value: dict[str, Any]
    if target.output_type == "brushlabels":
        value = {"format": "rle", "rle": mask_to_brush(mask), "brushlabels": [label]}
    else:
        points = mask_to_polygon(mask)
        if not points:
            return None
        value = {"points": points, "closed": True, "polygonlabels": [label]}
    return {"id": secrets.token_urlsafe(8)[:10], "from_name": target.output, "to_name": target.image,
            "type": target.output_type, "original_width": size.width, "original_height": size.height,
            "image_rotation": 0, "value": value, "score": score, "readonly": False}
