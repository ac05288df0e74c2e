"""Where the time of one `/predict` goes, stage by stage, for `/metrics` and the `Server-Timing` header.

Stages of a click, in order: `embedding` (image memory and cache lookup; on a miss, the wait for the
encode), `decoder` (prompt encoder + mask decoder at low resolution), `upsample` (the chosen mask to the
image size), `refine`, `rle` (the Label Studio brush result), `json` (the response body), `sidecar` (what
is left of the wait for the request's interaction rows to be written, which run alongside). Seconds are
summed over the objects of a request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STAGES = ("embedding", "decoder", "upsample", "refine", "rle", "json", "sidecar")


class StageTimes:
    """Seconds per stage of one request (`seconds[stage]`, wall clock, `time.perf_counter`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, observe: Callable[[float], object] | None = None) -> Iterator[None]:
        """Add the time spent inside the block to `name` (and hand it to `observe`, e.g. a histogram)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            if observe is not None:
                observe(spent)

    def header(self) -> str:
        """A `Server-Timing` value (durations in milliseconds), e.g. `decoder;dur=31.2, refine;dur=4.0`."""
        return ", ".join(f"{name};dur={s * 1000:.1f}" for name, s in self.seconds.items())
