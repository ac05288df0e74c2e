"""An image's embedding as a click (or background work) asks for it: task image URL → image SHA-256 → embedding.

The URL's digest is remembered (this process, then the shared tier), so a known URL with a cached embedding is never
fetched again; a miss is fetched (or taken from `FetchedAhead`), then encoded once: single-flight in the cache, once
across workers where a shared store is set (`serving.tiers`), clicks before background encodes (`serving.encoder`).
A click waits at most `SAM_CLICK_DEADLINE_S` for an encode, then gets `StillEncoding` (503) while it goes on.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from sam_backend.config import Settings
from sam_backend.labelstudio.images import ImageFetcher, LoadedImage, safe_url
from sam_backend.segment.embedding import Embedding
from sam_backend.segment.engines import Engine
from sam_backend.serving.cache import EmbeddingCache
from sam_backend.serving.encoder import CLICK, Encoder, StillEncoding
from sam_backend.serving.memory import ImageMemory
from sam_backend.serving.prefetch import FetchedAhead
from sam_backend.serving.tiers import SharedTier

log = logging.getLogger(__name__)


class ImageEmbeddings:
    """URL → `(image sha256, embedding, cache hit)` over the backend's cache, image memory, fetcher, encoder and
    shared tier (see the module docstring)."""

    def __init__(self, settings: Settings, cache: EmbeddingCache[Embedding], images: ImageMemory,
                 fetcher: ImageFetcher, encoder: Encoder, tier: SharedTier | None, metrics: Any,
                 fetched: FetchedAhead) -> None:
        self.settings, self.cache, self.images, self.fetcher = settings, cache, images, fetcher
        self.encoder, self.tier, self.metrics, self.fetched = encoder, tier, metrics, fetched

    def get(self, url: str, engine: Engine, priority: int = CLICK, started: float | None = None
            ) -> tuple[str, Embedding, bool]:
        """`(image sha256, embedding, cache hit)`; a known URL with a cached embedding is not fetched again. A click
        waits at most `SAM_CLICK_DEADLINE_S` (counted from `started`, `time.monotonic()`, default now) for an
        encode, then gets `StillEncoding` (503) while it goes on."""
        t0 = time.monotonic() if started is None else started
        known = self.images.digest(engine.engine_id, url)
        if known is None and self.tier is not None:  # another worker may have seen this URL
            known = self.tier.digest(engine.engine_id, url)
            if known is not None:
                self.images.remember(engine.engine_id, url, known)
        if known is not None:
            cached = self.cache.get((engine.engine_id, known))
            if cached is not None:
                return known, cached, True
            stored = self.tier.load(engine, known) if self.tier is not None else None
            if stored is not None:
                self.cache.put((engine.engine_id, known), stored)
                return known, stored, True
        loaded = self.fetched.take(url) or self.fetcher.load(url)
        self.images.remember(engine.engine_id, url, loaded.sha256)
        if self.tier is not None:
            self.tier.remember_digest(engine.engine_id, url, loaded.sha256)
        key = (engine.engine_id, loaded.sha256)
        if priority == CLICK:
            self.encoder.gate.promote(key)
        future, hit = self.cache.get_or_start(
            key, lambda: self._encode(engine, loaded, key, priority),
            run=self.encoder.submit if priority == CLICK else (lambda job: job()))
        if hit or priority != CLICK:
            return loaded.sha256, future.result(), hit
        left = self.settings.click_deadline_s - (time.monotonic() - t0)
        try:
            embedding = future.result(timeout=max(0.0, left))
        except FutureTimeout:
            self.metrics.click_deadline.inc()
            raise StillEncoding.left("image still encoding", self.encoder.seconds_left(key)) from None
        self.metrics.click_wait.observe(time.monotonic() - t0)
        return loaded.sha256, embedding, hit

    def _encode(self, engine: Engine, loaded: LoadedImage, key: tuple[str, str], priority: int) -> Embedding:
        """Encode here, or once across the workers that share a store (`serving.tiers`)."""
        if self.tier is None:
            return self._encode_here(engine, loaded, key, priority)
        return self.tier.encode_once(engine, loaded.sha256, lambda: self._encode_here(engine, loaded, key, priority))

    def _encode_here(self, engine: Engine, loaded: LoadedImage, key: tuple[str, str], priority: int
                     ) -> Embedding:
        t0 = time.perf_counter()
        embedding = self.encoder.encode(engine, loaded.pixels, key, priority)
        log.info("encoded %s (%dx%d) in %.2f s", safe_url(loaded.url), *loaded.size, time.perf_counter() - t0)
        return embedding
