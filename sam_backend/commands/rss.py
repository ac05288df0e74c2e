"""Peak resident memory over a block of work, sampled: `ru_maxrss` is the process's peak since it started, so a
block that stays under an earlier peak (an evaluation's base run, another category's training) would read as no
growth. Linux reads `/proc/self/statm`; elsewhere the figure falls back to `ru_maxrss`."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path
from types import TracebackType

STATM = Path("/proc/self/statm")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def rss_mb() -> float:
    """The process's resident memory now (MB), or its peak so far where `/proc` cannot be read."""
    try:
        return int(STATM.read_text().split()[1]) * PAGE_MB
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRss:
    """`with PeakRss() as peak: ...` then `peak.growth_mb`: the highest resident memory seen while the block ran
    (sampled every `interval_s` by a daemon thread, and once at each end) less the memory at its start."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Read the resident memory now into the peak (the sampling thread calls this every `interval_s`)."""
        self.peak_mb = max(self.peak_mb, rss_mb())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRss:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def growth_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)
