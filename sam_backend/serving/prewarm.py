"""The background encoder: images queued when a task is opened (or by `sam-backend precompute`) are
encoded on one worker thread, so the first click finds them cached.

Bounded (`SAM_PRECOMPUTE_QUEUE`), deduplicated by URL; a full queue drops the job (counted in
`/metrics`) and that image is encoded on its first click instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from sam_backend.errors import ClientError
from sam_backend.labelstudio.images import safe_url
from sam_backend.segment.engines import EngineError

log = logging.getLogger(__name__)


class Prewarmer:
    """Queue of image URLs and the worker that runs `encode(url)` for each."""

    def __init__(self, encode: Callable[[str], object], max_queued: int,
                 on_drop: Callable[[], None] = lambda: None) -> None:
        self._encode = encode
        self._on_drop = on_drop
        self._enabled = max_queued > 0
        self._queue: queue.Queue[str] = queue.Queue(maxsize=max(1, max_queued))
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        if self._worker is None and self._enabled:
            self._worker = threading.Thread(target=self._loop, name="precompute", daemon=True)
            self._worker.start()

    def schedule(self, url: str) -> None:
        """Queue `url` unless it is queued already or the queue is full (then count and log the drop)."""
        if self._worker is None:
            return
        with self._lock:
            if url in self._queued:
                return
            try:
                self._queue.put_nowait(url)
            except queue.Full:
                self._on_drop()
                log.warning("precompute queue full: %s will be encoded on its first click", safe_url(url))
                return
            self._queued.add(url)

    @property
    def pending(self) -> int:
        """Images queued or being encoded."""
        with self._lock:
            return len(self._queued)

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Block until nothing is queued (tests and `precompute`); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pending == 0:
                return True
            time.sleep(0.02)
        return False

    def _loop(self) -> None:
        while True:
            url = self._queue.get()
            try:
                self._encode(url)
            except (ClientError, EngineError) as exc:
                log.warning("precompute of %s failed: %s", safe_url(url), getattr(exc, "message", exc))
            except Exception:
                log.exception("precompute of %s failed", safe_url(url))
            finally:
                with self._lock:
                    self._queued.discard(url)
                self._queue.task_done()
