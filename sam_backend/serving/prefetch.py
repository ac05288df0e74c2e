"""Prefetch of the next tasks (`SAM_PREFETCH_NEXT=K`): when a task is opened, the next K unlabeled tasks of
its project (by id, read with Label Studio's API) have their images queued for the background encoder, so
an annotator who moves fast still finds each image encoded.

The lookup runs on its own thread (opening a task never waits for it), at most once per opened task in a
while (`recent`), and only where the backend has `LABEL_STUDIO_URL` and an API key. The images go through
the precompute queue: bounded by `SAM_PRECOMPUTE_QUEUE`, deduplicated by URL, lower priority than clicks.
`/metrics`: `sam_prefetch_total{result=queued|lookup|failed}`.

`FetchedAhead` serves batch jobs (`preannotate`) the same way one step earlier: the next image is downloaded and
decoded while the current one encodes, and its encode takes it from here instead of downloading it again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from sam_backend.errors import ClientError
from sam_backend.labelstudio.client import LabelStudioClient
from sam_backend.labelstudio.images import ImageFetcher, LoadedImage

log = logging.getLogger(__name__)


def next_tasks_query(after_id: int) -> str:
    """Label Studio's Data Manager query: unlabeled tasks with an id above `after_id`, by id."""
    return json.dumps({"filters": {"conjunction": "and", "items": [
        {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after_id},
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
    ]}, "ordering": ["tasks:id"]})


class Prefetcher:
    """Looks up the next `k` unlabeled tasks of a project and hands their image URLs to `schedule`."""

    def __init__(self, client: LabelStudioClient | None, k: int, schedule: Callable[[str], None],
                 count: Callable[[str], None] = lambda result: None, recent_s: float = 60.0) -> None:
        self.client, self.k, self.schedule, self.count = client, k, schedule, count
        self.recent_s = recent_s
        self._seen: dict[tuple[str, int], float] = {}
        self._jobs: queue.Queue[tuple[str, int, Callable[[Mapping[str, Any]], str | None]]] = queue.Queue(64)
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.k > 0

    def opened(self, project: str | None, task_id: object, image_url: Callable[[Mapping[str, Any]], str | None]
               ) -> None:
        """A task was opened: look up the tasks after it (in the background). `image_url(task)` gives a task's
        image URL, or None where it has none."""
        if not self.enabled or not project or not isinstance(task_id, int):
            return
        now = time.monotonic()
        with self._lock:
            if now - self._seen.get((project, task_id), -1e9) < self.recent_s:
                return
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.recent_s}
            self._seen[(project, task_id)] = now
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="prefetch", daemon=True)
                self._worker.start()
        try:
            self._jobs.put_nowait((project, task_id, image_url))
        except queue.Full:
            self.count("failed")

    def next_tasks(self, project: str, after_id: int) -> list[Mapping[str, Any]]:
        """The next `k` unlabeled tasks of `project` after task `after_id`, by id (filtered here as well, should
        the server ignore the query)."""
        assert self.client is not None
        r = self.client.call("GET", "/api/tasks/", params={"project": project, "page_size": self.k,
                                                           "query": next_tasks_query(after_id), "fields": "all"},
                             timeout=10)
        data = r.json()
        tasks = data.get("tasks", []) if isinstance(data, dict) else data
        fresh = [t for t in tasks if isinstance(t, Mapping) and isinstance(t.get("id"), int) and t["id"] > after_id
                 and not t.get("is_labeled") and not t.get("total_annotations")]
        return sorted(fresh, key=lambda t: t["id"])[: self.k]

    def _loop(self) -> None:
        while True:
            project, task_id, image_url = self._jobs.get()
            try:
                tasks = self.next_tasks(project, task_id)
                self.count("lookup")
                for task in tasks:
                    url = image_url(task)
                    if url:
                        self.schedule(url)
                        self.count("queued")
            except Exception as exc:  # Label Studio down or refusing: the clicks do not depend on it
                self.count("failed")
                log.warning("prefetch of the tasks after %s in project %s failed: %s", task_id, project,
                            str(exc)[:200])


FETCHED_AHEAD_BYTES = 256 * 2**20


class FetchedAhead:
    """Images a batch job fetched ahead of their encode, kept until taken, at most `limit_bytes` of pixels (the
    oldest go first)."""

    def __init__(self, fetcher: ImageFetcher, limit_bytes: int = FETCHED_AHEAD_BYTES) -> None:
        self.fetcher = fetcher
        self.limit_bytes = limit_bytes
        self._images: OrderedDict[str, LoadedImage] = OrderedDict()
        self._lock = threading.Lock()

    def fetch(self, url: str) -> None:
        """Download and decode `url` now; a failure is left to the encode's own fetch, which reports it."""
        try:
            loaded = self.fetcher.load(url)
        except ClientError:
            return
        with self._lock:
            self._images[url] = loaded
            while sum(v.pixels.nbytes for v in self._images.values()) > self.limit_bytes and len(self._images) > 1:
                self._images.popitem(last=False)

    def take(self, url: str) -> LoadedImage | None:
        """The image fetched ahead for `url` (once), else None."""
        with self._lock:
            return self._images.pop(url, None)
