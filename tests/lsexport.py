"""Build Label Studio JSON exports from synthetic masks (brush RLE via label-studio-sdk)."""

from __future__ import annotations

import cv2
import numpy as np

from sam_backend.labelstudio.results import mask_to_brush

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="Cat"/><Label value="Dog"/><Label value="Bird"/>
  </PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="Cat"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image"><Label value="Nose"/></KeyPointLabels>
</View>"""
CATEGORIES = ["Cat", "Dog", "Bird", "Nose"]


def tricky_masks(h: int = 120, w: int = 160) -> list[np.ndarray]:
    """A ring (hole), two separate blobs (components), a shape touching two borders."""
    ring = np.zeros((h, w), np.uint8)
    cv2.circle(ring, (50, 60), 35, 1, -1)
    cv2.circle(ring, (50, 60), 12, 0, -1)
    parts = np.zeros((h, w), np.uint8)
    cv2.rectangle(parts, (100, 10), (120, 30), 1, -1)
    cv2.ellipse(parts, (130, 90), (20, 12), 30, 0, 360, 1, -1)
    corner = np.zeros((h, w), np.uint8)
    corner[80:, :40] = 1
    return [m.astype(bool) for m in (ring, parts, corner)]


def brush(mask: np.ndarray, label: str, rid: str) -> dict:
    h, w = mask.shape
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush(mask), "brushlabels": [label]}}


def polygon(points_px: list[tuple[float, float]], label: str, rid: str, w: int = 160, h: int = 120) -> dict:
    return {"id": rid, "type": "polygonlabels", "from_name": "poly", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"points": [[x / w * 100, y / h * 100] for x, y in points_px],
                                            "closed": True, "polygonlabels": [label]}}


def rectangle(x, y, bw, bh, rid, w=160, h=120) -> dict:
    return {"id": rid, "type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"x": x / w * 100, "y": y / h * 100, "width": bw / w * 100,
                                            "height": bh / h * 100, "rotation": 0, "rectanglelabels": ["Cat"]}}


def keypoint(x, y, rid, w=160, h=120) -> dict:
    return {"id": rid, "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"x": x / w * 100, "y": y / h * 100, "width": 1, "keypointlabels": ["Nose"]}}


def task(task_id: int, results: list[dict], image: str | None = None, cancelled_extra: bool = False) -> dict:
    annotations = [{"id": task_id * 10, "result": results, "was_cancelled": False,
                    "created_at": "2026-11-26T10:00:00Z", "updated_at": "2026-11-26T10:00:00Z"}]
    if cancelled_extra:
        annotations.append({"id": task_id * 10 + 1, "result": [], "was_cancelled": True,
                            "created_at": "2026-11-26T11:00:00Z", "updated_at": "2026-11-26T11:00:00Z"})
    return {"id": task_id, "data": {"image": image or f"/data/upload/1/abc{task_id:05d}-img{task_id}.png"},
            "annotations": annotations}
