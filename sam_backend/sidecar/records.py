"""One interaction as the sidecar keeps it: what `SamBackend` hands over and `Store.record` writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Interaction:
    """One object's prediction in one `/predict` request.

    `prompt` is `ObjectPrompt.to_json()` (pixels); `mask` is the answered `(H, W) bool` mask (the store
    keeps it as COCO RLE, never as pixels); `created_at` is ISO 8601 UTC, filled in when queued.
    """

    image_id: str  # SHA-256 of the image bytes
    prompt: dict[str, Any]
    mask: np.ndarray | None = None
    project: str | None = None
    task_id: int | None = None
    image_url: str | None = None  # without query string or user info
    engine: str | None = None
    model_version: str | None = None
    label: str | None = None
    score: float | None = None
    latency_ms: float | None = None
    cache_hit: bool | None = None
    created_at: str | None = None
    # The request's `X-Request-ID` (nginx sends the same one on every try) with the task and object index:
    # a click retried on another replica is kept once. None where no id came with the request.
    request_key: str | None = None
