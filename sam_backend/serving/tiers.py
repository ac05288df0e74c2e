"""The shared tier as one backend uses it: image digests by URL, embeddings checked on load, and one encode per
image across every worker and replica that shares the store (see `serving.stores` for the stores)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sam_backend.segment.embedding import Embedding, EmbeddingFormatError
from sam_backend.segment.engines import Engine, EngineError
from sam_backend.serving.stores import LOCK_TTL_S, POLL_S, SharedStore, embedding_key, url_key

log = logging.getLogger(__name__)


class SharedTier:
    """`count(result)` is told `hit`, `miss` (encoded here), `waited` (another worker's encode) or `refused`."""

    def __init__(self, store: SharedStore, count: Callable[[str], None] = lambda result: None) -> None:
        self.store = store
        self.count = count

    def digest(self, engine_id: str, url: str) -> str | None:
        """The image digest another worker saw at `url`, or None."""
        value = self.store.get(url_key(engine_id, url))
        if value is None or len(value) != 64:
            return None
        return value.decode("ascii", "replace")

    def remember_digest(self, engine_id: str, url: str, digest: str) -> None:
        self.store.put(url_key(engine_id, url), digest.encode())

    def load(self, engine: Engine, image_id: str) -> Embedding | None:
        """The stored embedding of `image_id`, or None (not there, or refused: a torn or foreign value is deleted
        so that it is encoded again, never half-read)."""
        key = embedding_key(engine.engine_id, image_id)
        data = self.store.get(key)
        if data is None:
            return None
        try:
            embedding = engine.load(data)
        except (EmbeddingFormatError, EngineError) as exc:
            log.warning("refused the stored embedding %s (%s); encoding it again", key, exc)
            self.count("refused")
            self.store.delete(key)
            return None
        self.count("hit")
        return embedding

    def encode_once(self, engine: Engine, image_id: str, encode: Callable[[], Embedding]) -> Embedding:
        """The stored value if another worker has it; else the lock, `encode()` here and store it (compact);
        else wait for the worker that holds the lock (a dead worker's lock expires after `LOCK_TTL_S`)."""
        key = embedding_key(engine.engine_id, image_id)
        deadline = time.monotonic() + LOCK_TTL_S
        waited = False
        while True:
            stored = self.load(engine, image_id)
            if stored is not None:
                if waited:
                    self.count("waited")
                return stored
            if self.store.claim(key) or time.monotonic() > deadline:
                break
            waited = True
            time.sleep(POLL_S)
        try:
            stored = self.load(engine, image_id)  # stored between our look and our lock
            if stored is not None:
                return stored
            self.count("miss")
            embedding = encode()
            self.store.put(key, engine.dump(embedding, compact=True))
            return embedding
        finally:
            self.store.release(key)
