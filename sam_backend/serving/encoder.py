"""Image encodes, one at a time, clicks first.

One encode at a time bounds peak memory (a ViT-H encode holds gigabytes). The `PriorityGate` decides
who encodes next: a click (an annotator is waiting) always goes before background work (the prewarm of
an opened task, prefetch, `precompute`), so background work never delays a click by more than the one
encode already running. A click that joins a background encode of the same image promotes it.

`Encoder.encode` times every encode; the recent median is what a click told "still encoding" is given
as its estimate of seconds left.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from sam_backend.errors import ClientError
from sam_backend.segment.embedding import Embedding
from sam_backend.segment.engines import Engine

log = logging.getLogger(__name__)

CLICK = 0
BACKGROUND = 1


class StillEncoding(ClientError):
    """A click's image is not encoded within `SAM_CLICK_DEADLINE_S`; the encode goes on (503)."""

    default_status = 503

    @classmethod
    def left(cls, what: str, left_s: float | None) -> StillEncoding:
        """`<what> (about N s left): click again`, N the estimate (`time left not known yet` without one)."""
        when = "time left not known yet" if left_s is None else f"about {left_s:.0f} s left"
        return cls(f"{what} ({when}): click again")


class PriorityGate:
    """A lock whose waiters are served by (priority, arrival); `promote(key)` lifts a waiter (or a
    waiter yet to come) for `key` to click priority."""

    def __init__(self, on_yielded: Callable[[], None] = lambda: None,
                 background_queued: Callable[[], int] = lambda: 0) -> None:
        self._on_yielded = on_yielded
        self._background_queued = background_queued
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: list[list] = []  # [priority, seq, key]
        self._urgent: set[Hashable] = set()
        self._seq = itertools.count()
        self.running_key: Hashable | None = None
        self.running_since = 0.0

    @contextmanager
    def hold(self, priority: int, key: Hashable) -> Iterator[None]:
        """Hold the gate while encoding `key`; `on_yielded` counts each time a click goes before
        background work that was waiting or queued."""
        with self._cond:
            entry = [CLICK if key in self._urgent else priority, next(self._seq), key]
            self._waiting.append(entry)
            while self._busy or min(self._waiting) is not entry:
                self._cond.wait()
            self._waiting.remove(entry)
            if entry[0] == CLICK and (any(e[0] == BACKGROUND for e in self._waiting) or self._background_queued()):
                self._on_yielded()
            self._busy = True
            self.running_key, self.running_since = key, time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self.running_key = None
                self._urgent.discard(key)
                self._cond.notify_all()

    def promote(self, key: Hashable) -> None:
        with self._cond:
            self._urgent.add(key)
            for entry in self._waiting:
                if entry[2] == key:
                    entry[0] = CLICK
            self._cond.notify_all()

    def ahead_of(self, key: Hashable) -> tuple[int, float | None]:
        """`(-1, seconds it has run)` while `key` itself encodes; else `(encodes waiting before it, seconds the
        running encode has run, or None when the gate is free)`."""
        with self._cond:
            running = time.monotonic() - self.running_since if self._busy else None
            if self._busy and self.running_key == key:
                return -1, running
            keys = [entry[2] for entry in sorted(self._waiting)]
            return (keys.index(key) if key in keys else 0), running


class Encoder:
    """Runs `engine.embed` under the gate; click encodes run on their own threads so that the request
    can answer at its deadline while the encode goes on."""

    def __init__(self, on_encoded: Callable[[float], None] = lambda s: None,
                 on_yielded: Callable[[], None] = lambda: None, background_queued: Callable[[], int] = lambda: 0,
                 click_threads: int = 4) -> None:
        self.gate = PriorityGate(on_yielded, background_queued)
        self._on_encoded = on_encoded
        self._pool = ThreadPoolExecutor(click_threads, thread_name_prefix="click-encode")
        self._durations: deque[float] = deque(maxlen=20)
        self.total_s = 0.0  # seconds spent encoding since start (the encoder's share of a batch job)

    def encode(self, engine: Engine, pixels: np.ndarray, key: Hashable, priority: int) -> Embedding:
        """`engine.embed(pixels)` when the gate lets `key` through at `priority`."""
        with self.gate.hold(priority, key):
            t0 = time.perf_counter()
            embedding = engine.embed(pixels)
            elapsed = time.perf_counter() - t0
        self._durations.append(elapsed)
        self.total_s += elapsed
        self._on_encoded(elapsed)
        return embedding

    def submit(self, job: Callable[[], None]) -> None:
        """Run a click's encode job on a click thread."""
        self._pool.submit(job)

    @property
    def typical_s(self) -> float | None:
        """Median of the recent encode times on this machine, or None before the first."""
        return statistics.median(self._durations) if self._durations else None

    def seconds_left(self, key: Hashable) -> float | None:
        """Estimate of seconds until `key` is encoded, from the measured encode times (None before the first)."""
        typical = self.typical_s
        if typical is None:
            return None
        ahead, running = self.gate.ahead_of(key)
        if ahead < 0:  # running now
            return max(1.0, typical - (running or 0.0))
        current = max(0.0, typical - running) if running is not None else 0.0
        return max(1.0, current + typical * (ahead + 1))
