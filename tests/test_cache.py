"""EmbeddingCache: byte bound, LRU order, single flight under threads, failures not cached."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sam_backend.serving.cache import EmbeddingCache


def blob(n: int) -> np.ndarray:
    return np.zeros(n, np.uint8)


def test_byte_bound_evicts_least_recently_used():
    cache = EmbeddingCache(max_bytes=300)
    for key in "abc":
        cache.get_or_compute(key, lambda: blob(100))
    cache.get_or_compute("a", lambda: pytest.fail("a is cached"))  # touch a: b is now the oldest
    cache.get_or_compute("d", lambda: blob(100))
    assert "b" not in cache and all(k in cache for k in "acd")
    s = cache.stats()
    assert (s.bytes, s.entries, s.evictions, s.hits, s.misses) == (300, 3, 1, 1, 4)


def test_value_larger_than_the_cache_is_returned_not_stored():
    cache = EmbeddingCache(max_bytes=50)
    value, hit = cache.get_or_compute("big", lambda: blob(100))
    assert value.nbytes == 100 and not hit and "big" not in cache and cache.stats().bytes == 0


def arrived(cache: EmbeddingCache, n: int, timeout_s: float = 10.0) -> None:
    """Wait until `n` requests reached the cache (a miss each, or joined the one computing): a barrier on
    the cache's own counters, not on the clock."""
    deadline = time.monotonic() + timeout_s
    while (lambda s: s.misses + s.coalesced)(cache.stats()) < n:
        assert time.monotonic() < deadline, f"only {cache.stats()} after {timeout_s} s"
        time.sleep(0.001)


def test_single_flight_under_threads():
    cache = EmbeddingCache(max_bytes=10_000)
    calls = []
    gate = threading.Event()

    def compute():
        calls.append(1)
        gate.wait(5)
        return blob(10)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(cache.get_or_compute, "img", compute) for _ in range(16)]
        arrived(cache, 16)  # every thread is inside the cache: one computing, fifteen waiting for it
        gate.set()
        values = [f.result()[0] for f in futures]
    assert len(calls) == 1
    assert all(v is values[0] for v in values)
    assert cache.stats().coalesced == 15


def test_failures_reach_every_waiter_and_are_not_cached():
    cache = EmbeddingCache(max_bytes=10_000)
    gate = threading.Event()

    def boom():
        gate.wait(5)
        raise RuntimeError("encoder failed")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get_or_compute, "img", boom) for _ in range(4)]
        arrived(cache, 4)
        gate.set()
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, RuntimeError) for e in errors)
    assert "img" not in cache and not cache.is_pending("img") and cache.stats().failures == 1
    value, hit = cache.get_or_compute("img", lambda: blob(5))
    assert value.nbytes == 5 and not hit


def test_zero_budget_caches_nothing():
    cache = EmbeddingCache(max_bytes=0)
    cache.get_or_compute("a", lambda: blob(1))
    assert "a" not in cache
