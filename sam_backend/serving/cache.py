"""Embedding cache: an LRU bounded in bytes, thread-safe, single-flight.

The same class also bounds the backend's smaller memories (low-res logits per object, image
digests per URL) with another `size_of`.

Keys are `(engine_id, sha256 of the image bytes)`. However many threads ask for one key at
once, one of them computes and the others wait for its result; a failure is handed to every
waiter and nothing is stored, so the next request tries again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    """Counters since start; `bytes` is what the cache holds now."""

    hits: int
    misses: int
    coalesced: int
    evictions: int
    failures: int
    entries: int
    bytes: int
    max_bytes: int


class EmbeddingCache(Generic[V]):
    """LRU of computed values; `size_of(value)` gives a value's cost in bytes."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int] = lambda v: int(v.nbytes)) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._inflight: dict[Hashable, Future[V]] = {}
        self._bytes = 0
        self._hits = self._misses = self._coalesced = self._evictions = self._failures = 0

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """Return `(value, hit)`; `hit` is True only when the value was already stored. Computes in this
        thread when no other computation for `key` runs."""
        future, hit = self.get_or_start(key, compute, run=lambda job: job())
        return future.result(), hit

    def get_or_start(self, key: Hashable, compute: Callable[[], V],
                     run: Callable[[Callable[[], None]], object]) -> tuple[Future[V], bool]:
        """`(future of the value, hit)` without waiting: a stored value gives a done future; a running
        computation for `key` is joined; else `run(job)` is called with the job that computes and stores
        (`run` may call it at once or hand it to another thread)."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self._hits += 1
                done: Future[V] = Future()
                done.set_result(self._data[key][0])
                return done, True
            future = self._inflight.get(key)
            if future is not None:
                self._coalesced += 1
                return future, False
            future = Future()
            self._inflight[key] = future
            self._misses += 1

        def job() -> None:
            try:
                value = compute()
            except BaseException as exc:
                with self._lock:
                    del self._inflight[key]
                    self._failures += 1
                future.set_exception(exc)
                return
            with self._lock:
                self._store(key, value)
                del self._inflight[key]
            future.set_result(value)

        run(job)
        return future, False

    def get(self, key: Hashable) -> V | None:
        """The stored value (counted as a hit), or None without counting a miss."""
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            self._hits += 1
            return self._data[key][0]

    def put(self, key: Hashable, value: V) -> None:
        """Store `value` under `key` (replacing an older one), evicting as needed."""
        with self._lock:
            if key in self._data:
                self._bytes -= self._data.pop(key)[1]
            self._store(key, value)

    def discard(self, key: Hashable) -> None:
        """Drop `key` if stored."""
        with self._lock:
            if key in self._data:
                self._bytes -= self._data.pop(key)[1]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def is_pending(self, key: Hashable) -> bool:
        """True while a computation for `key` runs."""
        with self._lock:
            return key in self._inflight

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._coalesced, self._evictions, self._failures,
                              len(self._data), self._bytes, self.max_bytes)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def _store(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        if size > self.max_bytes:
            return  # larger than the whole cache: hand it out, keep nothing
        while self._bytes + size > self.max_bytes and self._data:
            _, (_, old) = self._data.popitem(last=False)
            self._bytes -= old
            self._evictions += 1
        self._data[key] = (value, size)
        self._bytes += size
