"""The training thread of `SAM_ADAPT`: a project's accepted masks (`sidecar.learning`) in, a better decoder version
out, off the click path. The schedule of one training is `segment.adapt`'s (`training_steps`, `training_set`,
`split_held_out`, `adapt`), the same code `evaluate --adapt-on` learns by.

- **When**: once a project has `SAM_ADAPT_MIN_MASKS` accepted masks, and again after every `SAM_ADAPT_EVERY` new
  ones (counted from the masks kept when the last training started, in the database: replicas agree). A failed or
  impossible training (too few usable masks, images that cannot be read) backs off: 30 s, doubling to an hour,
  and never re-queues itself without new masks. An engine without a SAM mask decoder queues nothing.
- **Who**: one trainer per project across replicas (`LearningStore.trainer`); a replica that finds it taken leaves
  the project to the one that holds it.
- **Cost**: a training learns from at most `SAM_ADAPT_MAX_MASKS` masks (`training_set`: the newest plus a sample of
  the older) and judges on the newest `MAX_HELD_OUT` held-out ones. Its embeddings come from the click cache when
  there, else from one encode at the lowest priority of the encoder's gate kept in learning's own small cache
  (`SAM_ADAPT_CACHE_MB`): an annotator's embedding is never pushed out. Before each step and each held-out run it
  waits while a click is in flight or prewarm work is queued (nice 19, one step ≈ 0.1 s of CPU).
- **Out**: an accepted version is published to the database (`LearningStore.publish`), which numbers it; only the
  newest `SAM_ADAPT_KEEP_VERSIONS` are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sam_backend.errors import ClientError
from sam_backend.labelstudio.accepted import MaskRecord, Skip
from sam_backend.segment.engines import Adaptable
from sam_backend.serving.adapt_versions import weights_of
from sam_backend.serving.cache import EmbeddingCache
from sam_backend.sidecar.learning import LearningStore, Training

if TYPE_CHECKING:  # `segment.adapt` imports torch: imported where a training runs, so a start is torch-free
    from sam_backend.segment.adapt import Example

log = logging.getLogger(__name__)

LEARN = 2  # the encoder gate's priority for learning's encodes: after clicks (0) and background prewarm (1)
MAX_HELD_OUT = 20  # held-out objects a version is judged on (the newest)
BACKOFF_S = (30.0, 3600.0)  # a failed or impossible training waits this long, doubling to the second figure


class LearningEmbeddings:
    """Embeddings for learning: the click cache's where it has them (read, never filled), else encoded at `LEARN`
    priority into a cache of learning's own (`budget_bytes`)."""

    def __init__(self, click_cache: Any, images: Any, fetcher: Any, encoder: Any, budget_bytes: int) -> None:
        self.click_cache = click_cache
        self.images = images  # the backend's URL → digest memory
        self.fetcher = fetcher
        self.encoder = encoder
        self.own: EmbeddingCache = EmbeddingCache(budget_bytes)

    def __call__(self, url: str, engine: Any) -> Any:
        digest = self.images.digest(engine.engine_id, url)
        found = self._cached((engine.engine_id, digest)) if digest is not None else None
        if found is not None:
            return found
        loaded = self.fetcher.load(url)
        self.images.remember(engine.engine_id, url, loaded.sha256)
        key = (engine.engine_id, loaded.sha256)
        found = self._cached(key)
        if found is None:
            found = self.encoder.encode(engine, loaded.pixels, key, LEARN)
            self.own.put(key, found)
        return found

    def _cached(self, key: tuple[str, str]) -> Any:
        """The click cache's embedding, else learning's own, else None."""
        found = self.click_cache.get(key)
        return found if found is not None else self.own.get(key)


class Trainer:
    """The training thread (see the module docstring). Collaborators: `store`; `base()` the loaded engine (None where
    it cannot be loaded); `embed(url, engine)`; `wait_idle(stop)` (blocks while clicks run; True where it waited);
    `metrics`; `on_version(project)` once a version is published; `on_skip(project, skip)`."""

    def __init__(self, settings: Any, store: LearningStore, base: Callable[[], Any],
                 embed: Callable[[str, Any], Any], wait_idle: Callable[[threading.Event], bool], metrics: Any,
                 on_version: Callable[[str], None], on_skip: Callable[[str | None, Skip], None]) -> None:
        self.settings = settings
        self.store = store
        self.base = base
        self.embed = embed
        self.wait_idle = wait_idle
        self.metrics = metrics
        self.on_version = on_version
        self.on_skip = on_skip
        self.states: dict[str, str] = {}  # project → queued | training (absent: idle)
        self.paused_steps = 0
        self.unsupported: str | None = None
        self._queue: queue.Queue[str] = queue.Queue()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self, projects: list[str]) -> None:
        if self._thread is None:
            for project in projects:
                self.queue(project)
            self._thread = threading.Thread(target=self._run, name="adapt", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put("")

    def queue(self, project: str) -> None:
        """Look at `project` soon (it trains only where due)."""
        with self._cond:
            if self.states.get(project):
                return
            self.states[project] = "queued"
        self._queue.put(project)

    def settle(self, timeout_s: float | None = None) -> bool:
        """Block until nothing is queued or training (for tests and commands); False where `timeout_s` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.states or self._stop.is_set(), timeout_s)

    # -- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # nice 19 for this thread only (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.is_set():
            project = self._queue.get()
            if not project or self._stop.is_set():
                break
            again = False
            try:
                again = self._look_at(project)
            except Exception:  # a failed training never stops learning for other projects, nor serving
                if not self._stop.is_set():
                    log.exception("project %s: training failed", project)
                    self.metrics.adapt_trainings.labels("failed").inc()
            finally:
                with self._cond:
                    self.states.pop(project, None)
                    if again and not self._stop.is_set():  # masks that came during the training: at once
                        self.states[project] = "queued"
                        self._queue.put(project)
                    self._cond.notify_all()
        with self._cond:
            self.states.clear()
            self._cond.notify_all()

    def _pause(self) -> None:
        from sam_backend.segment.adapt import AdaptError

        if self.wait_idle(self._stop):
            self.paused_steps += 1
            self.metrics.adapt_paused.inc()
        if self._stop.is_set():
            raise AdaptError("stopped")

    def supported(self, base: Any) -> bool:
        """Whether `base` has a SAM mask decoder to adapt; where not, `/health` says so (logged once)."""
        if isinstance(base, Adaptable):
            return True
        if self.unsupported is None:
            self.unsupported = (f"{type(base).__name__} has no SAM mask decoder to adapt; learning needs "
                                "SAM_ENGINE=sam (vit_t, vit_b, vit_l, vit_h)")
            log.warning("SAM_ADAPT=true: %s; accepted masks are kept, not learnt from", self.unsupported)
        return False

    def due(self, project: str, weights: str) -> bool:
        """Enough new accepted masks since the last training started, and no back-off in force."""
        n = self.store.mask_count(project)
        t = self.store.training(project, weights)
        if n < self.settings.adapt_min_masks or time.time() < t.retry_at:
            return False
        return t.attempted_at == 0 or n - t.attempted_at >= self.settings.adapt_every

    def _look_at(self, project: str) -> bool:
        """Train `project` where it is due and this process gets its lock; True where it trained and is due again
        (enough masks came during the training: the masks kept when it started count, so this never spins)."""
        base = self.base()
        if base is None or not self.supported(base):
            return False
        weights = weights_of(base)
        if not self.due(project, weights):
            return False
        with self.store.trainer(project) as mine:
            if not mine:  # the holder looks again when its training ends
                log.info("project %s: another replica is training it", project)
                return False
            if not self.due(project, weights):  # another replica trained it just before
                return False
            with self._cond:
                self.states[project] = "training"
            self._train(project, base, weights)
        return self.due(project, weights)

    def _examples(self, project: str, base: Any, records: list[MaskRecord]) -> list[Example]:
        from sam_backend.segment.adapt import AdaptError, Example

        out = []
        for record in records:
            self._pause()
            try:
                embedding = self.embed(record.image_url, base)
            except ClientError as exc:
                self.on_skip(project, Skip("image_unreadable", f"{record.key}: {exc.message}"))
                continue
            try:
                out.append(Example(embedding, record.mask(), key=record.key))
            except AdaptError as exc:
                self.on_skip(project, Skip(exc.reason, f"{record.key}: {exc} (image {record.image_url})"))
        return out

    def _back_off(self, project: str, weights: str, before: Training) -> None:
        failures = before.failures + 1
        wait_s = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (failures - 1))
        self.store.set_training(project, weights, replace(before, failures=failures, retry_at=time.time() + wait_s))
        log.info("project %s: next training no sooner than %.0f s from now (%d in a row without a result)", project,
                 wait_s, failures)

    def _train(self, project: str, base: Any, weights: str) -> None:
        from sam_backend.segment.adapt import (
            AdaptConfig,
            adapt,
            pack_version,
            split_held_out,
            training_set,
            training_steps,
        )

        records = self.store.masks(project)
        before = replace(self.store.training(project, weights), attempted_at=len(records))
        self.store.set_training(project, weights, before)
        train_records, held_records = split_held_out(records)
        train_records = training_set(train_records, self.settings.adapt_max_masks)
        held_records = held_records[-MAX_HELD_OUT:]
        self.metrics.adapt_training.set(1)
        t0 = time.perf_counter()
        try:
            train = self._examples(project, base, train_records)
            held = self._examples(project, base, held_records)
            if len(train) < 2 or not held:
                log.info("project %s: %d usable accepted masks to train on and %d to judge on; waiting for more",
                         project, len(train), len(held))
                self._back_off(project, weights, before)
                return
            steps = training_steps(len(train), self.settings.adapt_steps)
            outcome = adapt(base, train, held, AdaptConfig(steps=steps), pause=self._pause)
        except Exception:
            if not self._stop.is_set():
                self._back_off(project, weights, before)
            raise
        finally:
            self.metrics.adapt_training.set(0)
        seconds = time.perf_counter() - t0
        attempt = {"accepted": outcome.accepted, "trained_on": len(train), "held_out_objects": len(held),
                   "base": outcome.base.to_json() if outcome.base else None,
                   "adapted": outcome.adapted.to_json() if outcome.adapted else None,
                   "seconds": round(seconds, 1), "steps": steps, "at": time.time(), "accepted_masks": len(records)}
        self.metrics.adapt_trainings.labels("accepted" if outcome.accepted else "refused").inc()
        self.metrics.adapt_seconds.observe(seconds)
        self.store.set_training(project, weights, replace(before, last_attempt=attempt, failures=0, retry_at=0.0))
        if not outcome.accepted:
            log.info("project %s: the new decoder did not do better on %d held-out masks (NoC@90 %.2f against "
                     "%.2f, mIoU %.3f against %.3f); clicks keep their version", project, len(held),
                     outcome.adapted.noc90, outcome.base.noc90, outcome.adapted.miou5, outcome.base.miou5)
            return
        info = {"weights": weights, "trained_on": len(train), "accepted_masks": len(records),
                "held_out": {"objects": len(held), "base": attempt["base"], "adapted": attempt["adapted"]},
                "seconds": attempt["seconds"], "steps": steps, "created": time.time()}
        data = pack_version(outcome.state, {"weights": weights, "project": project, "trained_on": len(train)})
        number = self.store.publish(project, weights, data, info, self.settings.adapt_keep_versions)
        log.info("project %s: version %d serves clicks (learnt from %d masks in %.1f s; held-out NoC@90 %s → %s)",
                 project, number, len(train), seconds, (attempt["base"] or {}).get("noc90"),
                 (attempt["adapted"] or {}).get("noc90"))
        self.on_version(project)
