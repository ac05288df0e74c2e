"""The coordinator of one Label Studio `/predict` request.

Path of a click: task image URL → (image memory) image SHA-256 → embedding (cache, single-flight)
→ prompts (pixels of the decoded image) → engine masks (seeded with the object's previous
low-res logits) → refinement → a `brushlabels` RLE result (or `polygonlabels`) → sidecar row.

A request without a context (a task was opened) answers `{"results": []}` at once and queues the image
for the background encoder; keypoints may join a box drawn earlier (`serving.memory`'s object rule).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sam_backend import __version__
from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.accepted import project_of
from sam_backend.labelstudio.boxes import rectangles_to_answer
from sam_backend.labelstudio.client import LabelStudioClient
from sam_backend.labelstudio.context import parse_context
from sam_backend.labelstudio.images import ImageFetcher, safe_url
from sam_backend.labelstudio.labelconfig import LabelConfig, parse_label_config, required_image_url, task_image_url
from sam_backend.labelstudio.objects import ObjectRule
from sam_backend.labelstudio.results import mask_result
from sam_backend.segment.checkpoints import graph_base
from sam_backend.segment.embedding import Embedding
from sam_backend.segment.engines import Engine
from sam_backend.segment.engines.factory import make_engine
from sam_backend.segment.engines.onnx_sam import quick_engine
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.refine import clamp_to_box, refine
from sam_backend.serving.adapt_trainer import LearningEmbeddings
from sam_backend.serving.adapters import Activity, Adapters
from sam_backend.serving.cache import EmbeddingCache
from sam_backend.serving.embeddings import ImageEmbeddings
from sam_backend.serving.encoder import BACKGROUND, CLICK, Encoder
from sam_backend.serving.loader import EngineHolder, LoadTimes
from sam_backend.serving.memory import Memory, ObjectMemory
from sam_backend.serving.metrics import Metrics
from sam_backend.serving.prefetch import FetchedAhead, Prefetcher
from sam_backend.serving.prewarm import Prewarmer
from sam_backend.serving.stages import StageTimes
from sam_backend.serving.stores import SharedStore, open_store
from sam_backend.serving.tiers import SharedTier
from sam_backend.sidecar.records import Interaction

log = logging.getLogger(__name__)

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
        self.engine = EngineHolder(engine_factory or (lambda: make_engine(settings)),
                                   _load_times(settings) if engine_factory is None else None,
                                   quick=(lambda: quick_engine(settings))
                                   if engine_factory is None and settings.quick_start else None)
        self.cache = cache if cache is not None else EmbeddingCache(settings.cache_mb * 1024 * 1024)
        self.store = store if store is not None else open_store(settings.embedding_store,
                                                                 settings.embedding_store_mb * 2**20)
        self.memory = memory or Memory(objects=ObjectMemory(box_ttl_s=settings.object_memory_ttl_s,
                                                            shared=self.store))
        self.fetcher = fetcher or ImageFetcher(settings)
        self.metrics = Metrics(self.cache.stats)
        self.tier = _shared_tier(self.store, self.metrics)
        self.encoder = Encoder(on_encoded=self.metrics.encoder.observe, on_yielded=self.metrics.background_yielded.inc,
                               background_queued=lambda: self.prewarm.pending)
        self.prewarm = Prewarmer(lambda url: self.embedding(url, self.engine.get(), priority=BACKGROUND),
                                 settings.precompute_queue, on_drop=self.metrics.precompute_dropped.inc)
        self.prefetch = Prefetcher(_prefetch_client(settings), settings.prefetch_next, self.prewarm.schedule,
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
        self.fetched = FetchedAhead(self.fetcher)  # images a batch job fetched ahead (bounded)
        self.embeddings = ImageEmbeddings(settings, self.cache, self.memory.images, self.fetcher, self.encoder,
                                          self.tier, self.metrics, self.fetched)

    @property
    def model_version(self) -> str:
        """`sam-backend-<version>-<engine>-<model>` (see `model_version_of`)."""
        return model_version_of(self.settings, self.engine.peek())

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
            own = {self.model_version, *self.adapters.versions_of(project, self.model_version)}
            boxed = rectangles_to_answer(tasks, target.labels, target.output, own)
            if boxed is not None:  # Retrieve Predictions (or a task opened) on tasks that have rectangles
                with self.activity.click():
                    results = [self._masks_for_rectangles(task, rects, config, project, stages)
                               for task, rects in boxed]
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

    def _masks_for_rectangles(self, task: Mapping[str, Any], rects: list, config: LabelConfig,
                              project: str | None, stages: StageTimes | None) -> dict[str, Any]:
        """One prediction for `task`: a mask from each rectangle as a box prompt (each as its own object)."""
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
        base = self.engine.for_click(self.settings.click_deadline_s, self.metrics.click_deadline.inc,
                                     full=self.adapters.may_adapt(project))
        engine = self.adapters.engine_for(project, base)  # the project's adapted decoder, if it has one
        results = context.get("result") if isinstance(context, Mapping) else None
        first = results[0] if isinstance(results, list) and results and isinstance(results[0], Mapping) else {}
        target = config.for_image(first.get("to_name"))
        url = required_image_url(task, target)
        with stages.stage("embedding"):
            image_id, embedding, hit = self.embedding(url, base, started=started)
        margin = self.settings.refine.box_margin_px  # what may leak past a box: its clicks still refine it
        rule = ObjectRule(self.memory.objects, (engine.engine_id, image_id, task.get("id")),
                          self.settings.object_memory, margin)
        out, scores, empty = [], [], 0
        prompts = parse_context(context, image_size=embedding.image_size, remembered_box=rule.box_for,
                                join_margin_px=margin, max_pixels=self.settings.max_image_pixels)
        for prompt in rule.unanswered(prompts):
            mask, score = self.segment_prompt(engine, embedding, image_id, prompt, stages)
            rule.answered(prompt, mask)
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

    def embedding(self, url: str, engine: Engine, priority: int = CLICK, started: float | None = None
                  ) -> tuple[str, Embedding, bool]:
        """`(image sha256, embedding, cache hit)` (see `serving.embeddings`)."""
        return self.embeddings.get(url, engine, priority, started)

    def fetch_ahead(self, url: str) -> None:
        """Download and decode `url` now, so that its encode (queued next by a batch job such as `preannotate`) does
        not wait for the download (see `serving.prefetch.FetchedAhead`)."""
        self.fetched.fetch(url)


def model_version_of(settings: Settings, engine: Engine | None) -> str:
    """`sam-backend-<version>-<engine>-<model>`, naming the model actually loaded (read off its checkpoint:
    `SAM_CHECKPOINT` may hold another model than `SAM_MODEL_TYPE`'s default); before the engine is loaded, the model
    the settings name."""
    if settings.engine == "grabcut":
        return f"sam-backend-{__version__}-grabcut"
    loaded = engine.id.model if engine is not None else None
    return f"sam-backend-{__version__}-{settings.engine}-{loaded or settings.model_type}"


def _load_times(settings: Settings) -> LoadTimes | None:
    """Where the previous load's duration is kept (beside the checkpoint); None for GrabCut (nothing to load)."""
    if settings.engine == "grabcut":
        return None
    return LoadTimes(graph_base(settings.checkpoint_path).with_name(
        f"{settings.checkpoint_path.name}.load-{settings.engine}.json"))


def _shared_tier(store: SharedStore | None, metrics: Metrics) -> SharedTier | None:
    """The shared tier over `store` (None without one), its outage and lookups on `/metrics`."""
    if store is None:
        return None
    outage = store.outage
    metrics.store_errors.set_function(lambda: outage.errors)
    metrics.store_up.set_function(lambda: 0 if outage.down else 1)
    return SharedTier(store, count=lambda result: metrics.store.labels(result).inc())


def _prefetch_client(settings: Settings) -> LabelStudioClient | None:
    """Label Studio's API for `SAM_PREFETCH_NEXT` (None where it is off or cannot be asked: then a warning)."""
    if settings.prefetch_next and settings.label_studio_url and settings.label_studio_api_key:
        return LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    if settings.prefetch_next:
        log.warning("SAM_PREFETCH_NEXT=%d needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read the project's "
                    "tasks; only opened tasks are precomputed", settings.prefetch_next)
    return None


class EmptyAnswer(ClientError):
    """The model returned an empty mask for every object of the request (422): said, never a silent `[]`."""

    default_status = 422
