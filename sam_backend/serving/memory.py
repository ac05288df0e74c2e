"""What the backend remembers between clicks, besides embeddings: behind one small interface.

- images: image URL → SHA-256 of its bytes (per engine), for 10 minutes, so a click on a known image
  finds its embedding without downloading the image again;
- objects: an object's prompt → the low-res logits `(256, 256) float32` its last answer came from, so
  the next click on the same object (same points plus one) is seeded with them. Bounded in bytes.
  And per task, image and label, the box of the current object, for `SAM_OBJECT_MEMORY_TTL_S`.

The object rule (which object a click belongs to, and the box it may join) is in one place:
`sam_backend.labelstudio.objects`, with its table of cases; this module only keeps what it needs.

Keys carry the engine id and the image digest, so another model or image never reads them.

With a shared store (`SAM_EMBEDDING_STORE`), objects' logits and boxes are also written there (logits as
raw float32 with their shape, boxes with the time they were set, both expiring), so the next click on the
same object finds them whichever worker or replica it lands on.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import TYPE_CHECKING

import numpy as np

from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.serving.cache import CacheStats, EmbeddingCache

if TYPE_CHECKING:
    from sam_backend.serving.stores import SharedStore

MASK_SIDE = 512  # the current object's answer is kept at most this many pixels on its long side
LOGITS_BYTES = 64 * 1024 * 1024  # ≈ 256 objects of 256 × 256 float32
URL_ENTRIES = 4096
URL_TTL_S = 600.0


class ImageMemory:
    """Image URL → image digest, per engine; an entry lasts `ttl_s` (an image replaced at the same URL
    is fetched again after that)."""

    def __init__(self, entries: int = URL_ENTRIES, ttl_s: float = URL_TTL_S) -> None:
        self._memo: EmbeddingCache[tuple[str, float]] = EmbeddingCache(entries, size_of=lambda v: 1)
        self.ttl_s = ttl_s

    def digest(self, engine_id: str, url: str) -> str | None:
        """The digest last seen at `url`, or None (unknown or expired)."""
        memo = self._memo.get((engine_id, url))
        if memo is None or time.monotonic() - memo[1] >= self.ttl_s:
            return None
        return memo[0]

    def remember(self, engine_id: str, url: str, digest: str) -> None:
        self._memo.put((engine_id, url), (digest, time.monotonic()))

    def stats(self) -> CacheStats:
        return self._memo.stats()


class ObjectMemory:
    """An object's prompt → the low-res logits of its last answer, bounded in bytes."""

    def __init__(self, max_bytes: int = LOGITS_BYTES, box_ttl_s: float = 600.0, boxes: int = 4096,
                 shared: SharedStore | None = None, logits_ttl_s: float = 3600.0) -> None:
        self._logits: EmbeddingCache[np.ndarray] = EmbeddingCache(max_bytes)
        self._boxes: EmbeddingCache[tuple[np.ndarray, float]] = EmbeddingCache(boxes, size_of=lambda v: 1)
        self._rectangles: EmbeddingCache[float] = EmbeddingCache(boxes, size_of=lambda v: 1)  # answered, by geometry
        # the current object's last answer, at most MASK_SIDE px on its long side: `(mask, scale to it)`
        self._masks: EmbeddingCache[tuple[np.ndarray, float]] = EmbeddingCache(boxes, size_of=lambda v: 1)
        self.box_ttl_s = box_ttl_s
        self.shared = shared
        self.logits_ttl_s = logits_ttl_s

    @staticmethod
    def _shared_key(kind: str, key: tuple) -> str:
        return f"{kind}:{hashlib.sha256(repr(key).encode()).hexdigest()}"

    def _shared_box(self, key: tuple) -> tuple[np.ndarray, float] | None:
        """A box another worker remembered: `(box, age in seconds)` turned into this process's clock."""
        if self.shared is None:
            return None
        data = self.shared.get(self._shared_key("box", key))
        if data is None or len(data) != 24:
            return None
        *box, at = struct.unpack("<4fd", data)
        return np.array(box, np.float32), time.monotonic() - max(0.0, time.time() - at)

    def _share_box(self, key: tuple, box: np.ndarray) -> None:
        if self.shared is not None:
            self.shared.put(self._shared_key("box", key), struct.pack("<4fd", *map(float, box), time.time()),
                            ttl_s=self.box_ttl_s)

    def current_box(self, key: tuple) -> np.ndarray | None:
        """The current object's box `(4,) XYXY` pixels under `key` (engine, image, task, label), or None where there
        is none or it has expired (then it is forgotten). Whether a click belongs to it: `labelstudio.objects`."""
        entry = self._boxes.get(key) or self._shared_box(key)
        if entry is None:
            return None
        box, at = entry
        if time.monotonic() - at >= self.box_ttl_s:
            self.forget_box(key)
            return None
        return box

    def remember_box(self, key: tuple, box: np.ndarray) -> None:
        self._boxes.put(key, (np.asarray(box, np.float32).copy(), time.monotonic()))
        self._share_box(key, box)

    def remember_mask(self, key: tuple, mask: np.ndarray) -> None:
        """Keep the current object's answer `(H, W) bool`, downscaled to `MASK_SIDE` px on its long side."""
        import cv2

        scale = min(1.0, MASK_SIDE / max(mask.shape))
        small = mask if scale == 1.0 else cv2.resize(mask.astype(np.uint8), None, fx=scale, fy=scale,
                                                     interpolation=cv2.INTER_NEAREST) > 0
        self._masks.put(key, (small, scale))

    def on_mask(self, key: tuple, point: tuple[float, float]) -> bool:
        """Whether the pixel `point` lies on the current object's last answer (forgotten with its box; the caller
        has the current box already, so no store is asked again per point)."""
        entry = self._masks.get(key)
        if entry is None:
            return False
        small, scale = entry
        h, w = small.shape
        x, y = int(point[0] * scale), int(point[1] * scale)
        return 0 <= x < w and 0 <= y < h and bool(small[y, x])

    def forget_box(self, key: tuple) -> None:
        self._masks.discard(key)
        self._boxes.discard(key)
        if self.shared is not None:
            self.shared.delete(self._shared_key("box", key))

    def rectangle_answered(self, key: tuple) -> bool:
        """Whether the rectangle `key` (engine, image, task, label, rounded box) was answered within the box
        time limit."""
        at = self._rectangles.get(key)
        return at is not None and time.monotonic() - at < self.box_ttl_s

    def mark_rectangle(self, key: tuple) -> None:
        self._rectangles.put(key, time.monotonic())

    def previous(self, engine_id: str, image_id: str, prompt: ObjectPrompt) -> np.ndarray | None:
        """Logits of the answer to this object before its newest point, or None."""
        before = prompt.without_last_point()
        if before is None:
            return None
        key = (engine_id, image_id, before.key())
        found = self._logits.get(key)
        if found is None and self.shared is not None:
            data = self.shared.get(self._shared_key("logits", key))
            if data is not None and len(data) >= 8:
                h, w = struct.unpack("<II", data[:8])
                if len(data) == 8 + 4 * h * w:
                    found = np.frombuffer(data, "<f4", offset=8).reshape(h, w).copy()
                    self._logits.put(key, found)
        return found

    def remember(self, engine_id: str, image_id: str, prompt: ObjectPrompt, logits: np.ndarray) -> None:
        key = (engine_id, image_id, prompt.key())
        self._logits.put(key, logits)
        if self.shared is not None:
            raw = np.ascontiguousarray(logits, "<f4")
            self.shared.put(self._shared_key("logits", key), struct.pack("<II", *raw.shape) + raw.tobytes(),
                            ttl_s=self.logits_ttl_s)

    def stats(self) -> CacheStats:
        return self._logits.stats()


class Memory:
    """The backend's memories of images and objects."""

    def __init__(self, images: ImageMemory | None = None, objects: ObjectMemory | None = None) -> None:
        self.images = images or ImageMemory()
        self.objects = objects or ObjectMemory()
