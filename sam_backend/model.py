"""Glue: one Label Studio `/predict` request → Label Studio results.

Path of a click: task image URL → (URL memo) image SHA-256 → embedding (cache, single-flight)
→ prompts (pixels of the decoded image) → engine masks (seeded with the object's previous
low-res logits) → refinement → a `brushlabels` RLE result (or `polygonlabels`) → sidecar row.

A request without a context (a task was opened) answers `{"results": []}` at once and queues
the image's embedding on a background worker, so the first click finds it cached.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from sam_backend import __version__
from sam_backend.cache import EmbeddingCache
from sam_backend.config import Settings
from sam_backend.engines import Embedding, Engine, EngineError, make_engine
from sam_backend.errors import ClientError
from sam_backend.images import ImageFetcher, LoadedImage, safe_url
from sam_backend.masks import mask_to_polygons, polygon_area
from sam_backend.metrics import Metrics
from sam_backend.prompts import ObjectPrompt, parse_context
from sam_backend.refine import refine
from sam_backend.rle import encode_brush

log = logging.getLogger(__name__)

LOGITS_CACHE_BYTES = 64 * 1024 * 1024  # ≈ 256 objects of 256 × 256 float32
URL_MEMO_ENTRIES = 4096
URL_MEMO_TTL_S = 600.0


class RequestError(ClientError):
    """The request itself cannot be served (400)."""


@dataclass(frozen=True)
class TargetControls:
    """What the label config offers for one image: where masks go and which labels exist."""

    image: str  # Image object name
    value_key: str  # task.data key holding the image URL
    output: str  # BrushLabels or PolygonLabels control name
    output_type: str  # "brushlabels" or "polygonlabels"
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelConfig:
    targets: tuple[TargetControls, ...]

    def for_image(self, image: str | None) -> TargetControls:
        for t in self.targets:
            if image is None or t.image == image:
                return t
        return self.targets[0]


@lru_cache(maxsize=64)
def parse_label_config(config: str) -> LabelConfig:
    """Find each Image with a BrushLabels (preferred) or PolygonLabels control on it."""
    if not isinstance(config, str) or not config.strip():
        raise RequestError("label_config: expected the project's labeling config XML, got nothing")
    try:
        li = LabelInterface(config)
    except Exception as exc:  # the SDK raises several XML/validation classes
        raise RequestError(f"label_config: not a valid labeling config ({str(exc)[:200]})") from None
    targets = []
    for obj in li.objects:
        if obj.tag.lower() != "image":
            continue
        key = str(obj.value).lstrip("$")
        outputs = [c for c in li.controls if obj.name in (c.to_name or [])]
        for kind in ("brushlabels", "polygonlabels"):
            found = [c for c in outputs if c.tag.lower() == kind]
            if found:
                c = found[0]
                targets.append(TargetControls(obj.name, key, c.name, kind, tuple(c.labels or ())))
                break
    if not targets:
        raise RequestError("label_config: expected an <Image> with a <BrushLabels> or <PolygonLabels> control for the "
                           "masks; see label_config/points-and-boxes-brush.xml")
    return LabelConfig(tuple(targets))


def mask_to_brush(mask: np.ndarray) -> list[int]:
    """`(H, W) bool` → Label Studio brush RLE (row-major RGBA); byte-identical to label-studio-sdk's
    `mask2rle`, vectorised (see `sam_backend.rle` for why)."""
    return encode_brush(mask)


def mask_to_polygon(mask: np.ndarray, tolerance_px: float = 1.0) -> list[list[float]]:
    """Outer contour of the largest component, simplified, on pixel edges, as Label Studio percent `[[x, y], ...]`."""
    h, w = mask.shape
    polygons, _ = mask_to_polygons(mask, tolerance_px)
    if not polygons:
        return []
    largest = np.asarray(max(polygons, key=polygon_area)).reshape(-1, 2)
    return [[float(x) / w * 100.0, float(y) / h * 100.0] for x, y in largest]


class EngineHolder:
    """Builds the engine once, off the request path; remembers a failure so every request can say why."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self.error: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._try_get, name="engine-load", daemon=True).start()

    def _try_get(self) -> None:
        with contextlib.suppress(EngineError):
            self.get()

    @property
    def ready(self) -> bool:
        return self._engine is not None

    def get(self) -> Engine:
        if self._engine is not None:
            return self._engine
        with self._lock:
            if self._engine is None:
                try:
                    self._engine = self._factory()
                    self.error = None
                except EngineError as exc:
                    self.error = str(exc)
                    log.error("engine not available: %s", exc)
                    raise
                except Exception as exc:
                    self.error = f"engine failed to load ({exc.__class__.__name__}: {exc})"
                    log.exception("engine failed to load")
                    raise EngineError(self.error) from None
            return self._engine


class SamBackend:
    """The model behind the server: caches, engine, precompute worker, sidecar hook."""

    def __init__(self, settings: Settings, engine_factory: Callable[[], Engine] | None = None,
                 fetcher: ImageFetcher | None = None, recorder: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        self.engine = EngineHolder(engine_factory or (lambda: make_engine(settings)))
        self.cache: EmbeddingCache[Embedding] = EmbeddingCache(settings.cache_mb * 1024 * 1024)
        self.logits: EmbeddingCache[np.ndarray] = EmbeddingCache(LOGITS_CACHE_BYTES)
        self.url_memo: EmbeddingCache[tuple[str, float]] = EmbeddingCache(URL_MEMO_ENTRIES, size_of=lambda v: 1)
        self.fetcher = fetcher or ImageFetcher(settings)
        self.metrics = Metrics(self.cache.stats)
        self.recorder = recorder
        self.setup_config: str | None = None
        self._queue: queue.Queue[str] = queue.Queue(maxsize=max(1, settings.precompute_queue))
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self._worker: threading.Thread | None = None

    @property
    def model_version(self) -> str:
        kind = f"sam-{self.settings.model_type}" if self.settings.engine == "sam" else self.settings.engine
        return f"sam-backend-{__version__}-{kind}"

    def start(self) -> None:
        """Load the engine and start the precompute worker, both in the background."""
        self.engine.start()
        if self._worker is None and self.settings.precompute_queue > 0:
            self._worker = threading.Thread(target=self._precompute_loop, name="precompute", daemon=True)
            self._worker.start()

    # -- /setup -------------------------------------------------------------------------------
    def setup(self, body: Mapping[str, Any]) -> dict[str, Any]:
        schema = body.get("schema")
        if schema is not None:
            parse_label_config(schema)
            self.setup_config = schema
        hostname = body.get("hostname")
        if isinstance(hostname, str) and hostname.startswith(("http://", "https://")):
            self.fetcher.setup_hostname = hostname.rstrip("/")
        return {"model_version": self.model_version}

    # -- /predict -----------------------------------------------------------------------------
    def predict(self, body: Mapping[str, Any]) -> dict[str, Any]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, Mapping) for t in tasks):
            raise RequestError(f"tasks: expected a list of task objects, got {type(tasks).__name__}")
        params = body.get("params") or {}
        if not isinstance(params, Mapping):
            raise RequestError(f"params: expected an object, got {type(params).__name__}")
        config = parse_label_config(body.get("label_config") or self.setup_config or "")
        context = params.get("context")
        if not context or not (isinstance(context, Mapping) and context.get("result")):
            for task in tasks:
                self._schedule(self._image_url(task, config.targets[0]))
            return {"results": [], "model_version": self.model_version}
        project = str(body.get("project") or "").split(".")[0] or None
        results = [self._predict_task(task, config, context, project) for task in tasks]
        return {"results": results, "model_version": self.model_version}

    def _image_url(self, task: Mapping[str, Any], target: TargetControls) -> str:
        data = task.get("data")
        if not isinstance(data, Mapping) or target.value_key not in data:
            raise RequestError(f"task {task.get('id')}: expected data.{target.value_key} (the image URL named by "
                               f"<Image value=\"${target.value_key}\">), got keys {sorted(data or {})}")
        return data[target.value_key]

    def _predict_task(self, task: Mapping[str, Any], config: LabelConfig, context: Mapping[str, Any],
                      project: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        engine = self.engine.get()
        results = context.get("result") if isinstance(context, Mapping) else None
        first = results[0] if isinstance(results, list) and results and isinstance(results[0], Mapping) else {}
        target = config.for_image(first.get("to_name"))
        url = self._image_url(task, target)
        image_id, embedding, hit = self.embedding(url, engine)
        height, width = embedding.image_size
        prompts = parse_context(context, image_size=(width, height))
        out, scores = [], []
        for prompt in prompts:
            t_dec = time.perf_counter()
            prev_key = prompt.without_last_point()
            prev = self.logits.get((embedding.engine_id, image_id, prev_key.key())) if prev_key else None
            pred = engine.predict(embedding, prompt, prev_logits=prev)
            best = pred.best
            if pred.low_res_logits is not None:
                self.logits.put((embedding.engine_id, image_id, prompt.key()), pred.low_res_logits[best])
            mask = refine(pred.masks[best], prompt, self.settings.refine)
            self.metrics.decoder.observe(time.perf_counter() - t_dec)
            score = float(pred.scores[best])
            result = self._result(mask, prompt, score, target, width, height)
            if result is None:
                continue
            out.append(result)
            scores.append(score)
            if self.recorder is not None:
                self.recorder({
                    "project": project, "task_id": task.get("id"), "image_id": image_id, "image_url": safe_url(url),
                    "prompt": prompt.to_json(), "engine": embedding.engine_id, "model_version": self.model_version,
                    "score": score, "mask": mask, "label": result["value"].get(target.output_type, [None])[0],
                    "latency_ms": (time.perf_counter() - t0) * 1000.0, "cache_hit": hit,
                })
        return {"result": out, "score": float(np.mean(scores)) if scores else 0.0, "model_version": self.model_version}

    def _result(self, mask: np.ndarray, prompt: ObjectPrompt, score: float, target: TargetControls,
                width: int, height: int) -> dict[str, Any] | None:
        if not mask.any():
            return None
        label = prompt.label if prompt.label in target.labels else (target.labels[0] if target.labels else prompt.label)
        value: dict[str, Any]
        if target.output_type == "brushlabels":
            value = {"format": "rle", "rle": mask_to_brush(mask), "brushlabels": [label]}
        else:
            points = mask_to_polygon(mask)
            if not points:
                return None
            value = {"points": points, "closed": True, "polygonlabels": [label]}
        return {"id": secrets.token_urlsafe(8)[:10], "from_name": target.output, "to_name": target.image,
                "type": target.output_type, "original_width": width, "original_height": height,
                "image_rotation": 0, "value": value, "score": score, "readonly": False}

    # -- embeddings ---------------------------------------------------------------------------
    def embedding(self, url: str, engine: Engine) -> tuple[str, Embedding, bool]:
        """`(image sha256, embedding, cache hit)`; a known URL with a cached embedding is not fetched again."""
        memo = self.url_memo.get((engine.engine_id, url))
        if memo is not None and time.monotonic() - memo[1] < URL_MEMO_TTL_S:
            cached = self.cache.get((engine.engine_id, memo[0]))
            if cached is not None:
                return memo[0], cached, True
        loaded = self.fetcher.load(url)
        self.url_memo.put((engine.engine_id, url), (loaded.sha256, time.monotonic()))
        embedding, hit = self.cache.get_or_compute((engine.engine_id, loaded.sha256),
                                                   lambda: self._encode(engine, loaded))
        return loaded.sha256, embedding, hit

    def _encode(self, engine: Engine, loaded: LoadedImage) -> Embedding:
        t0 = time.perf_counter()
        embedding = engine.embed(loaded.pixels)
        self.metrics.encoder.observe(time.perf_counter() - t0)
        log.info("encoded %s (%dx%d) in %.2f s", safe_url(loaded.url), *loaded.size, time.perf_counter() - t0)
        return embedding

    # -- precompute ---------------------------------------------------------------------------
    def _schedule(self, url: str) -> None:
        if self._worker is None:
            return
        with self._queued_lock:
            if url in self._queued:
                return
            try:
                self._queue.put_nowait(url)
            except queue.Full:
                self.metrics.precompute_dropped.inc()
                log.warning("precompute queue full: %s will be encoded on its first click", safe_url(url))
                return
            self._queued.add(url)

    def _precompute_loop(self) -> None:
        while True:
            url = self._queue.get()
            try:
                self.embedding(url, self.engine.get())
            except (ClientError, EngineError) as exc:
                log.warning("precompute of %s failed: %s", safe_url(url), getattr(exc, "message", exc))
            except Exception:
                log.exception("precompute of %s failed", safe_url(url))
            finally:
                with self._queued_lock:
                    self._queued.discard(url)
                self._queue.task_done()

    @property
    def precompute_pending(self) -> int:
        """Images queued or being encoded by the precompute worker."""
        with self._queued_lock:
            return len(self._queued)

    def wait_precomputed(self, timeout_s: float = 60.0) -> bool:
        """Block until the precompute queue is empty (tests and `precompute`); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._queued_lock:
                if not self._queued:
                    return True
            time.sleep(0.02)
        return False
