"""`sam-backend precompute`: ask a running backend to encode a project's images before anyone clicks.

Each task is sent to the backend's `/predict` without a context, exactly as Label Studio does when a
task is opened; the backend queues the encode. Sending is paced by `/health`'s `precompute_pending`
so the bounded queue never overflows, and stops at the number of embeddings the cache can hold
(4 MiB each for ViT-B/L/H), since more would only evict the first ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import requests
from tqdm import tqdm

from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.client import LabelStudioClient

log = logging.getLogger(__name__)
EMBEDDING_MB = 4


class PrecomputeError(RuntimeError):
    """Label Studio or the backend cannot be used for precomputing."""


def _backend_session(settings: Settings) -> requests.Session:
    session = requests.Session()
    if settings.basic_auth_user:
        session.auth = (settings.basic_auth_user, settings.basic_auth_pass or "")
    return session


def _pending(session: requests.Session, backend: str) -> int:
    r = session.get(backend + "/health", timeout=5)
    if r.status_code != 200:
        raise PrecomputeError(f"{backend}/health answered HTTP {r.status_code}")
    return int(r.json().get("precompute_pending", 0))


def run_precompute(settings: Settings, project: int, backend: str, limit: int | None = None,
                   poll_s: float = 0.2, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Queue every task image of `project` (up to the cache's capacity) and wait until all are encoded."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise PrecomputeError("precompute needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    try:
        config = client.project(project)["label_config"]
        tasks = client.tasks(project)
    except (ClientError, RuntimeError, requests.RequestException, ValueError, KeyError) as exc:
        raise PrecomputeError(f"reading project {project} from {client.url} failed: "
                              f"{getattr(exc, 'message', exc)}") from None
    capacity = max(1, settings.cache_mb // EMBEDDING_MB)
    wanted = min(len(tasks), limit if limit is not None else capacity)
    if wanted < len(tasks):
        log.warning("encoding %d of %d tasks: the cache holds about %d embeddings (SAM_CACHE_MB=%d)", wanted,
                    len(tasks), capacity, settings.cache_mb)
    session = _backend_session(settings)
    depth = max(1, settings.precompute_queue - 1)
    sent = 0
    deadline = time.monotonic() + timeout_s
    with tqdm(total=wanted, unit="image", desc="precompute") as bar:
        for task in tasks[:wanted]:
            while _pending(session, backend) >= depth:
                if time.monotonic() > deadline:
                    raise PrecomputeError("the backend did not keep up within the time limit")
                time.sleep(poll_s)
            body = {"tasks": [task], "label_config": config, "project": str(project), "params": {"context": None}}
            r = session.post(backend + "/predict", json=body, timeout=30)
            if r.status_code != 200:
                raise PrecomputeError(f"{backend}/predict answered HTTP {r.status_code}: {r.text[:200]}")
            sent += 1
            done = sent - _pending(session, backend)
            bar.update(max(0, done - bar.n))
        while (left := _pending(session, backend)) > 0:
            if time.monotonic() > deadline:
                raise PrecomputeError("the backend did not finish within the time limit")
            bar.update(max(0, sent - left - bar.n))
            time.sleep(poll_s)
        bar.update(sent - bar.n)
    entries = session.get(backend + "/health", timeout=5).json().get("cache_entries")
    return {"project": project, "tasks": len(tasks), "queued": sent, "backend_cache_entries": entries}
