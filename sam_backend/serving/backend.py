"""The coordinator of one Label Studio `/predict` request.

Path of a click: task image URL → (image memory) image SHA-256 → embedding (cache, single-flight)
→ prompts (pixels of the decoded image) → engine masks (seeded with the object's previous
low-res logits) → refinement → a `brushlabels` RLE result (or `polygonlabels`) → sidecar row.

A request without a context (a task was opened) answers `{"results": []}` at once and queues the image
for the background encoder; keypoints may join a box drawn earlier (`serving.memory`'s object rule).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from sam_backend import __version__
from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.accepted import positive_id
from sam_backend.labelstudio.boxes import has_masks, newest_live_annotation, rectangles_of, task_rectangles
from sam_backend.labelstudio.client import LabelStudioClient
from sam_backend.labelstudio.context import parse_context
from sam_backend.labelstudio.images import ImageFetcher, LoadedImage, safe_url
from sam_backend.labelstudio.labelconfig import LabelConfig, parse_label_config, required_image_url, task_image_url
from sam_backend.labelstudio.objects import ObjectRule
from sam_backend.labelstudio.results import mask_result
from sam_backend.segment.checkpoints import graph_base
from sam_backend.segment.embedding import Embedding
from sam_backend.segment.engines import Engine, make_engine
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.refine import clamp_to_box, refine
from sam_backend.serving.adapt_trainer import LearningEmbeddings
from sam_backend.serving.adapters import Activity, Adapters
from sam_backend.serving.cache import EmbeddingCache
from sam_backend.serving.encoder import BACKGROUND, CLICK, Encoder, StillEncoding
from sam_backend.serving.loader import EngineHolder, LoadTimes
from sam_backend.serving.memory import Memory, ObjectMemory
from sam_backend.serving.metrics import Metrics
from sam_backend.serving.prefetch import Prefetcher
from sam_backend.serving.prewarm import Prewarmer
from sam_backend.serving.stages import StageTimes
from sam_backend.serving.stores import SharedStore, open_store
from sam_backend.serving.tiers import SharedTier
from sam_backend.sidecar.records import Interaction

log = logging.getLogger(__name__)

FETCHED_AHEAD_BYTES = 256 * 2**20


class RequestError(ClientError):
    """The request itself cannot be served (400)."""


class SamBackend:
    """The model behind the server: engine, embedding cache, memories, background encoder, sidecar hook."""

    def __init__(self, settings: Settings, engine_factory: Callable[[], Engine] | None = None,
                 fetcher: ImageFetcher | None = None, recorder: Callable[[Interaction], None] | None = None,
                 cache: EmbeddingCache[Embedding] | None = None, memory: Memory | None = None,
                 store: SharedStore | None = None) -> None:
        """`cache` and `memory` may be shared by several backends of one engine (the evaluator does); `store` is
        the shared tier behind the cache (default: the one `SAM_EMBEDDING_STORE` names, if any)."""
        self.settings = settings
        times = None
        if engine_factory is None and settings.engine != "grabcut":
            times = LoadTimes(graph_base(settings.checkpoint_path).with_name(
                f"{settings.checkpoint_path.name}.load-{settings.engine}.json"))
        self.engine = EngineHolder(engine_factory or (lambda: make_engine(settings)), times)
        self.cache = cache if cache is not None else EmbeddingCache(settings.cache_mb * 1024 * 1024)
        self.store = store if store is not None else open_store(settings.embedding_store,
                                                                 settings.embedding_store_mb * 2**20)
        self.memory = memory or Memory(objects=ObjectMemory(box_ttl_s=settings.object_memory_ttl_s,
                                                            shared=self.store))
        self.fetcher = fetcher or ImageFetcher(settings)
        self.metrics = Metrics(self.cache.stats)
        self.tier = None
        if self.store is not None:
            outage = self.store.outage
            self.metrics.store_errors.set_function(lambda: outage.errors)
            self.metrics.store_up.set_function(lambda: 0 if outage.down else 1)
            self.tier = SharedTier(self.store, count=lambda result: self.metrics.store.labels(result).inc())
        self.encoder = Encoder(on_encoded=self.metrics.encoder.observe, on_yielded=self.metrics.background_yielded.inc,
                               background_queued=lambda: self.prewarm.pending)
        self.prewarm = Prewarmer(lambda url: self.embedding(url, self.engine.get(), priority=BACKGROUND),
                                 settings.precompute_queue, on_drop=self.metrics.precompute_dropped.inc)
        client = None
        if settings.prefetch_next and settings.label_studio_url and settings.label_studio_api_key:
            client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        elif settings.prefetch_next:
            log.warning("SAM_PREFETCH_NEXT=%d needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read the project's "
                        "tasks; only opened tasks are precomputed", settings.prefetch_next)
        self.prefetch = Prefetcher(client, settings.prefetch_next, self.prewarm.schedule,
                                   count=lambda result: self.metrics.prefetch.labels(result).inc())
        self.recorder = recorder
        if recorder is not None and hasattr(recorder, "on_lost"):
            recorder.on_lost = lambda reason: self.metrics.sidecar_lost.labels(reason).inc()
        self.setup_config: str | None = None
        self.activity = Activity()  # clicks in flight: background learning waits for them
        self.adapters = Adapters(
            settings, engine=self.engine, metrics=self.metrics, activity=self.activity,
            busy=lambda: self.prewarm.pending > 0,
            embeddings=LearningEmbeddings(self.cache, self.memory.images, self.fetcher, self.encoder,
                                          settings.adapt_cache_mb * 1024 * 1024))
        self.metrics.watch_adapters(self.adapters.answers)
        self._fetched: OrderedDict[str, LoadedImage] = OrderedDict()  # images a batch job fetched ahead (bounded)
        self._fetched_lock = threading.Lock()

    @property
    def model_version(self) -> str:
        """`sam-backend-<version>-<engine>-<model>`, naming the model actually loaded (read off its checkpoint:
        `SAM_CHECKPOINT` may hold another model than `SAM_MODEL_TYPE`'s default); before the engine is loaded,
        the model the settings name."""
        engine = self.engine.peek()
        loaded = getattr(engine, "architecture_name", None) if engine is not None else None
        if self.settings.engine == "grabcut":
            kind = "grabcut"
        else:
            kind = f"{self.settings.engine}-{loaded or self.settings.model_type}"
        return f"sam-backend-{__version__}-{kind}"

    @property
    def encoder_kind(self) -> str | None:
        """The image encoder's path (`aoti`, `onnx`, `eager`; see `SAM_ENCODER`), `measuring` while the background
        measurement runs, None before the engine is loaded."""
        engine = self.engine.peek()
        if engine is None:
            return None
        tuning = getattr(engine, "encoder_tuning", None)
        kind = getattr(engine, "encoder_kind", "eager")
        return "measuring" if tuning is not None and tuning.is_alive() and kind == "eager" else kind

    @property
    def decoder_kind(self) -> str | None:
        """The decoder path clicks run (`onnx`, `compile`, `eager`; see `SAM_DECODER`), None before the engine
        is loaded."""
        engine = self.engine.peek()
        return None if engine is None else getattr(engine, "decoder_kind", "eager")

    def start(self) -> None:
        """Load the engine and start the background encoder, both in the background."""
        self.engine.start()
        self.prewarm.start()
        self.adapters.start()

    def setup(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """`/setup`: check the config; remember the `hostname` (used only without LABEL_STUDIO_URL)."""
        schema = body.get("schema")
        if schema is not None:
            parse_label_config(schema)
            self.setup_config = schema
        hostname = body.get("hostname")
        if isinstance(hostname, str) and hostname.startswith(("http://", "https://")):
            self.fetcher.setup_hostname = hostname.rstrip("/")
        project = project_of(body)
        return {"model_version": self.version_for(project)}

    def webhook(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """`/webhook`: annotation events feed learning (`SAM_ADAPT`, what Label Studio confirms of them); every other
        event is acknowledged."""
        return self.adapters.webhook(dict(body))

    def version_for(self, project: str | None) -> str:
        """The model version a project's clicks get: `model_version`, plus its adapted decoder's version if any."""
        return self.adapters.model_version_for(project, self.model_version)

    def predict(self, body: Mapping[str, Any], stages: StageTimes | None = None,
                request_id: str | None = None, written: list | None = None) -> dict[str, Any]:
        """`/predict`: masks for the context's objects, or (no context) queue the tasks' images. `stages`
        collects the seconds of each stage of a click (see `serving.stages`); `request_id` (a load balancer's
        `X-Request-ID`, the same on a retry) keys the sidecar rows so that a retried click is kept once;
        `written` collects what the recorder returns for each row (events the app may wait for)."""
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, Mapping) for t in tasks):
            raise RequestError(f"tasks: expected a list of task objects, got {type(tasks).__name__}")
        params = body.get("params") or {}
        if not isinstance(params, Mapping):
            raise RequestError(f"params: expected an object, got {type(params).__name__}")
        config = parse_label_config(body.get("label_config") or self.setup_config or "")
        project = project_of(body)
        context = params.get("context")
        if not context or not (isinstance(context, Mapping) and context.get("result")):
            target = config.targets[0]
            boxed = self._rectangles_to_answer(tasks, target, project)
            if boxed is not None:  # Retrieve Predictions (or a task opened) on tasks that have rectangles
                with self.activity.click():
                    results = [self._masks_for_rectangles(task, rects, config, body, stages) for task, rects in boxed]
                return {"results": results, "model_version": self.version_for(project)}
            for task in tasks:
                self.prewarm.schedule(required_image_url(task, target))
                self.prefetch.opened(project, task.get("id"), lambda t: task_image_url(t, target.value_key))
            return {"results": [], "model_version": self.model_version}
        stages = stages if stages is not None else StageTimes()
        with self.activity.click():
            results = [self._predict_task(task, config, context, project, stages,
                                          None if request_id is None else f"{request_id}:{i}",
                                          written if written is not None else [])
                       for i, task in enumerate(tasks)]
        return {"results": results, "model_version": self.version_for(project)}

    def _rectangles_to_answer(self, tasks: list, target: Any, project: str | None = None
                              ) -> list[tuple[Mapping[str, Any], list]] | None:
        """`[(task, its rectangles)]` where a request without a context (Label Studio's Retrieve Predictions, or a
        task opened with "use predictions to prelabel") carries tasks with rectangles: those of the newest live
        annotation, else of the newest prediction not written by this backend; a task whose newest annotation holds
        masks already is left alone. None where no task has one."""
        own = {self.model_version, *self.adapters.versions_of(project, self.model_version)}
        found = []
        for task in tasks:
            annotation = newest_live_annotation(task)
            if annotation is not None and has_masks(annotation):  # labeled with masks already: left alone
                found.append((task, []))
                continue
            rects = rectangles_of(annotation, "annotation") or task_rectangles(task, "predictions", own)
            usable = []
            for rect in rects:
                why = rect.unusable(target.labels, target.output)
                if why is None:
                    usable.append(rect)
                else:
                    log.warning("task %s: %s, left out (%s)", task.get("id"), *why)
            found.append((task, usable))
        return found if any(rects for _, rects in found) else None

    def _masks_for_rectangles(self, task: Mapping[str, Any], rects: list, config: LabelConfig,
                              body: Mapping[str, Any], stages: StageTimes | None) -> dict[str, Any]:
        """One prediction for `task`: a mask from each rectangle as a box prompt (each as its own object)."""
        project = project_of(body)
        out, scores = [], []
        for n, rect in enumerate(rects):
            context = {"result": [rect.as_context(n)]}
            try:
                answer = self._predict_task(task, config, context, project, stages or StageTimes(), None, [])
            except EmptyAnswer:
                continue
            for r in answer["result"]:
                out.append({**r, "id": f"{rect.region_id or n}-mask"})
                scores.append(answer["score"])
        return {"result": out, "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.version_for(project)}

    def _predict_task(self, task: Mapping[str, Any], config: LabelConfig, context: Mapping[str, Any],
                      project: str | None, stages: StageTimes, request_key: str | None, written: list
                      ) -> dict[str, Any]:
        t0 = time.perf_counter()
        started = time.monotonic()
        base = self._engine_for_click()
        engine = self.adapters.engine_for(project, base)  # the project's adapted decoder, if it has one
        results = context.get("result") if isinstance(context, Mapping) else None
        first = results[0] if isinstance(results, list) and results and isinstance(results[0], Mapping) else {}
        target = config.for_image(first.get("to_name"))
        url = required_image_url(task, target)
        with stages.stage("embedding"):
            image_id, embedding, hit = self.embedding(url, base, started=started)
        margin = self.settings.refine.box_margin_px  # what may leak past a box: its clicks still refine it
        memory = ObjectRule(self.memory.objects, (engine.engine_id, image_id, task.get("id")),
                            self.settings.object_memory, margin)
        out, scores, empty = [], [], 0
        prompts = parse_context(context, image_size=embedding.image_size, remembered_box=memory.box_for,
                                join_margin_px=margin, max_pixels=self.settings.max_image_pixels)
        for prompt in memory.unanswered(prompts):
            mask, score = self.segment_prompt(engine, embedding, image_id, prompt, stages)
            memory.answered(prompt, mask)
            label = target.label_for(prompt.label)
            with stages.stage("rle"):
                result = mask_result(mask, label, score, target) if mask.any() else None
            if result is None:
                empty += 1
                continue
            out.append(result)
            scores.append(score)
            if self.recorder is not None:
                written.append(self.recorder(Interaction(
                    image_id=image_id, prompt=prompt.to_json(), mask=mask, project=project, task_id=task.get("id"),
                    image_url=safe_url(url), engine=embedding.engine_id, model_version=self.version_for(project),
                    label=label, score=score, latency_ms=(time.perf_counter() - t0) * 1000.0, cache_hit=hit,
                    request_key=None if request_key is None else f"{request_key}:{len(out) - 1}")))
        if empty and not out:
            raise EmptyAnswer("the model found no object at this prompt (its mask is empty): click inside the "
                              "object, add a positive click, or draw a box around it")
        return {"result": out, "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.version_for(project)}

    def segment_prompt(self, engine: Engine, embedding: Embedding, image_id: str, prompt: ObjectPrompt,
                 stages: StageTimes) -> tuple[np.ndarray, float]:
        """`(mask (H, W) bool, score)` for one object: the model's best mask (seeded with the object's previous
        logits), refined; where refinement would empty it, the unrefined mask clamped to the box instead."""
        objects = self.memory.objects
        with stages.stage("decoder", observe=self.metrics.decoder.observe):
            pred = engine.predict(embedding, prompt, prev_logits=objects.previous(engine.engine_id, image_id, prompt))
        best = pred.best
        if pred.low_res_logits is not None:
            objects.remember(engine.engine_id, image_id, prompt, pred.low_res_logits[best])
        with stages.stage("upsample"):
            raw = pred.best_mask
        with stages.stage("refine"):
            mask = refine(raw, prompt, self.settings.refine)
        if not mask.any() and raw.any():
            margin = self.settings.refine.box_margin_px
            mask = clamp_to_box(raw, prompt.box, margin) if prompt.box is not None else raw.copy()
            self.metrics.refine_emptied.inc()
        return mask, float(pred.scores[best])

    def _engine_for_click(self) -> Engine:
        """The engine; while it loads, a click waits at most `SAM_CLICK_DEADLINE_S`, then gets `ModelLoading` (503)
        with the time the load has left, as a click waiting for an encode does."""
        engine = self.engine.wait(self.settings.click_deadline_s)
        if engine is None:
            self.metrics.click_deadline.inc()
            left_s = self.engine.seconds_left()
            when = "time left not known yet" if left_s is None else f"about {left_s:.0f} s left"
            raise ModelLoading(f"model loading ({when}): click again")
        return engine

    def embedding(self, url: str, engine: Engine, priority: int = CLICK, started: float | None = None
                  ) -> tuple[str, Embedding, bool]:
        """`(image sha256, embedding, cache hit)`; a known URL with a cached embedding is not fetched again. A click
        waits at most `SAM_CLICK_DEADLINE_S` (counted from `started`, `time.monotonic()`, default now) for an
        encode, then gets `StillEncoding` (503) while it goes on."""
        t0 = time.monotonic() if started is None else started
        known = self.memory.images.digest(engine.engine_id, url)
        if known is None and self.tier is not None:  # another worker may have seen this URL
            known = self.tier.digest(engine.engine_id, url)
            if known is not None:
                self.memory.images.remember(engine.engine_id, url, known)
        if known is not None:
            cached = self.cache.get((engine.engine_id, known))
            if cached is not None:
                return known, cached, True
            stored = self.tier.load(engine, known) if self.tier is not None else None
            if stored is not None:
                self.cache.put((engine.engine_id, known), stored)
                return known, stored, True
        loaded = self._take_fetched(url) or self.fetcher.load(url)
        self.memory.images.remember(engine.engine_id, url, loaded.sha256)
        if self.tier is not None:
            self.tier.remember_digest(engine.engine_id, url, loaded.sha256)
        key = (engine.engine_id, loaded.sha256)
        if priority == CLICK:
            self.encoder.gate.promote(key)
        future, hit = self.cache.get_or_start(
            key, lambda: self._encode(engine, loaded, key, priority),
            run=self.encoder.submit if priority == CLICK else (lambda job: job()))
        if hit or priority != CLICK:
            return loaded.sha256, future.result(), hit
        left = self.settings.click_deadline_s - (time.monotonic() - t0)
        try:
            embedding = future.result(timeout=max(0.0, left))
        except FutureTimeout:
            self.metrics.click_deadline.inc()
            left_s = self.encoder.seconds_left(key)
            when = "time left not known yet" if left_s is None else f"about {left_s:.0f} s left"
            raise StillEncoding(f"image still encoding ({when}): click again") from None
        self.metrics.click_wait.observe(time.monotonic() - t0)
        return loaded.sha256, embedding, hit

    def fetch_ahead(self, url: str) -> None:
        """Download and decode `url` now, so that its encode (queued next by a batch job such as `preannotate`) does
        not wait for the download: the encoder then runs back to back while the next image downloads. Kept until
        used, at most `FETCHED_AHEAD_BYTES` of pixels (the oldest go first); a failure is left to the encode's own
        fetch, which reports it."""
        try:
            loaded = self.fetcher.load(url)
        except ClientError:
            return
        with self._fetched_lock:
            self._fetched[url] = loaded
            while sum(v.pixels.nbytes for v in self._fetched.values()) > FETCHED_AHEAD_BYTES and len(self._fetched) > 1:
                self._fetched.popitem(last=False)

    def _take_fetched(self, url: str) -> LoadedImage | None:
        with self._fetched_lock:
            return self._fetched.pop(url, None)

    def _encode(self, engine: Engine, loaded: LoadedImage, key: tuple[str, str], priority: int) -> Embedding:
        """Encode here, or once across the workers that share a store (`serving.tiers`)."""
        if self.tier is None:
            return self._encode_here(engine, loaded, key, priority)
        return self.tier.encode_once(engine, loaded.sha256, lambda: self._encode_here(engine, loaded, key, priority))

    def _encode_here(self, engine: Engine, loaded: LoadedImage, key: tuple[str, str], priority: int
                     ) -> Embedding:
        t0 = time.perf_counter()
        embedding = self.encoder.encode(engine, loaded.pixels, key, priority)
        log.info("encoded %s (%dx%d) in %.2f s", safe_url(loaded.url), *loaded.size, time.perf_counter() - t0)
        return embedding


def project_of(body: Mapping[str, Any]) -> str | None:
    """The project id of a Label Studio request (`"<id>.<timestamp>"` or `<id>`) as a string of digits, or None
    where it is not a positive integer (it keys stores and names model versions)."""
    found = positive_id(str(body.get("project") or "").split(".")[0])
    return None if found is None else str(found)


class ModelLoading(StillEncoding):
    """A click arrived while the model loads and the load did not end within `SAM_CLICK_DEADLINE_S` (503)."""


class EmptyAnswer(ClientError):
    """The model returned an empty mask for every object of the request (422): said, never a silent `[]`."""

    default_status = 422
