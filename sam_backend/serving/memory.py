"""What the backend remembers between clicks, besides embeddings: behind one small interface.

- images: image URL → SHA-256 of its bytes (per engine), for 10 minutes, so a click on a known image
  finds its embedding without downloading the image again;
- objects: an object's prompt → the low-res logits `(256, 256) float32` its last answer came from, so
  the next click on the same object (same points plus one) is seeded with them. Bounded in bytes.

Keys carry the engine id and the image digest, so another model or image never reads them.
"""

from __future__ import annotations

import time

import numpy as np

from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.serving.cache import CacheStats, EmbeddingCache

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

    def __init__(self, max_bytes: int = LOGITS_BYTES) -> None:
        self._logits: EmbeddingCache[np.ndarray] = EmbeddingCache(max_bytes)

    def previous(self, engine_id: str, image_id: str, prompt: ObjectPrompt) -> np.ndarray | None:
        """Logits of the answer to this object before its newest point, or None."""
        before = prompt.without_last_point()
        if before is None:
            return None
        return self._logits.get((engine_id, image_id, before.key()))

    def remember(self, engine_id: str, image_id: str, prompt: ObjectPrompt, logits: np.ndarray) -> None:
        self._logits.put((engine_id, image_id, prompt.key()), logits)

    def stats(self) -> CacheStats:
        return self._logits.stats()


class Memory:
    """The backend's memories of images and objects."""

    def __init__(self, images: ImageMemory | None = None, objects: ObjectMemory | None = None) -> None:
        self.images = images or ImageMemory()
        self.objects = objects or ObjectMemory()
