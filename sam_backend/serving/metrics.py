"""Prometheus metrics of one backend instance (own registry, so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sam_backend.serving.cache import CacheStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 5, 30)


MAX_LABELS = 100  # distinct labels on /metrics (a project's label config has a few)


class Metrics:
    """Request counts and latencies, encoder/decoder seconds, embedding-cache counters."""

    def __init__(self, cache_stats: Callable[[], CacheStats]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sam_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("sam_request_seconds", "HTTP request latency in seconds", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.encoder = Histogram("sam_encoder_seconds", "Image encoder time per image in seconds",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.decoder = Histogram("sam_decoder_seconds", "Mask decoder time per object in seconds",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.click_stage = Histogram("sam_click_stage_seconds",
                                     "Seconds of each stage of a click (embedding, decoder, upsample, refine, rle, "
                                     "json), per request", ["stage"], buckets=_STAGE_BUCKETS, registry=self.registry)
        self.decoder_kind = Gauge("sam_decoder_info", "The decoder path clicks run (1 for the kind in use)", ["kind"],
                                  registry=self.registry)
        self.encoder_kind = Gauge("sam_encoder_info", "The image encoder's path (1 for the kind in use, 0 for others)",
                                  ["kind"], registry=self.registry)
        self.model_ready = Gauge("sam_model_ready", "1 once the model is loaded, 0 while it loads or failed",
                                 registry=self.registry)
        self.click_wait = Histogram("sam_click_encode_wait_seconds",
                                    "Seconds a click waited for its image's encode (cache misses only)",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.background_yielded = Counter("sam_background_yielded",
                                          "Times a click's encode went before waiting background work",
                                          registry=self.registry)
        self.click_deadline = Counter("sam_click_deadline",
                                      "Clicks answered 'still encoding' at SAM_CLICK_DEADLINE_S",
                                      registry=self.registry)
        self.refine_emptied = Counter("sam_refine_emptied",
                                      "Masks the refinement emptied; answered unrefined (clamped to the box)",
                                      registry=self.registry)
        self.sidecar_lost = Counter("sam_sidecar_lost", "Interactions the sidecar could not keep, by reason",
                                    ["reason"], registry=self.registry)
        self.precompute_dropped = Counter("sam_precompute_dropped", "Precompute jobs dropped (queue full)",
                                          registry=self.registry)
        self.prefetch = Counter("sam_prefetch", "Prefetch of the next tasks (SAM_PREFETCH_NEXT): Label Studio "
                                "lookups, images queued, lookups failed", ["result"], registry=self.registry)
        self.store = Counter("sam_store", "Shared embedding store lookups after a local miss, by result (hit: "
                             "loaded from the store; miss: encoded here; waited: another worker's encode was "
                             "awaited; refused: a torn or foreign value was replaced)", ["result"],
                             registry=self.registry)
        self.store_errors = Gauge("sam_store_errors", "Shared store operations that failed (store unreachable)",
                                  registry=self.registry)
        self.store_up = Gauge("sam_store_up", "1 while the shared embedding store answers, 0 in an outage",
                              registry=self.registry)
        # SAM_ADAPT (serving.adapters): per project, the version clicks use and what it was learnt from
        self.adapter_version = Gauge("sam_adapter_version", "Adapted decoder version serving a project's clicks "
                                     "(0: the base model)", ["project"], registry=self.registry)
        self.adapter_masks = Gauge("sam_adapter_accepted_masks", "Accepted masks kept for a project",
                                   ["project"], registry=self.registry)
        self.adapter_learnt = Gauge("sam_adapter_learnt_masks", "Accepted masks the serving version was trained on",
                                    ["project"], registry=self.registry)
        self.adapter_noc90 = Gauge("sam_adapter_heldout_noc90", "Held-out NoC@90 of the serving version (adapted) "
                                   "and of the base model, on the project's held-out accepted masks",
                                   ["project", "model"], registry=self.registry)
        self.adapter_miou = Gauge("sam_adapter_heldout_miou5", "Held-out mean IoU over the first five simulated "
                                  "clicks, adapted and base", ["project", "model"], registry=self.registry)
        self.adapt_skipped = Counter("sam_adapt_skipped", "Accepted-mask input not learnt from, by reason",
                                     ["reason"], registry=self.registry)
        self.adapt_trainings = Counter("sam_adapt_trainings", "Trainings by result (accepted: a new version serves; "
                                       "refused: worse on held-out masks; failed)", ["result"],
                                       registry=self.registry)
        self.adapt_paused = Counter("sam_adapt_paused", "Training steps that waited for clicks or prewarm",
                                    registry=self.registry)
        self.adapt_training = Gauge("sam_adapt_training", "1 while a project's decoder trains", registry=self.registry)
        self.adapt_seconds = Histogram("sam_adapt_seconds", "Seconds of one training (encodes, steps, held-out check)",
                                       buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800), registry=self.registry)
        # the report's live figure (sidecar.report.live; SAM_ADAPT confirms each accepted annotation)
        self.accepted_clicks = Histogram("sam_accepted_object_prompts", "Prompts (boxes and clicks) the backend "
                                         "answered for each accepted region, by label", ["label"],
                                         buckets=(1, 2, 3, 4, 5, 7, 10, 15, 20, 30), registry=self.registry)
        self.accepted_objects = Counter("sam_accepted_objects", "Accepted regions by label and by who made them "
                                        "(backend: from its answers; hand: drawn without it)", ["label", "made"],
                                        registry=self.registry)
        self._labels: set[str] = set()
        self.registry.register(_CacheCollector(cache_stats))

    def watch_adapters(self, answers: Callable[[], dict[str, dict[str, int]]]) -> None:
        """`sam_adapter_clicks{project, answer}`: clicks a project's adapted version answered (`adapted`) and those
        that fell back to the released decoder (`released`), read from `answers()` at each scrape."""
        self.registry.register(_AdapterAnswers(answers))

    def observe_accepted(self, label: str | None, prompts: int) -> None:
        """One accepted region: `prompts` answered for it (0: drawn by hand). Labels come from annotations Label
        Studio confirmed; past `MAX_LABELS` distinct ones they are counted as `other`."""
        name = (label or "")[:64]
        if name not in self._labels:
            if len(self._labels) >= MAX_LABELS:
                name = "other"
            else:
                self._labels.add(name)
        self.accepted_objects.labels(name, "backend" if prompts else "hand").inc()
        if prompts:
            self.accepted_clicks.labels(name).observe(prompts)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        """One click's stage seconds (see `serving.stages`) into `sam_click_stage_seconds`."""
        for stage, value in seconds.items():
            self.click_stage.labels(stage).observe(value)

    def render(self) -> bytes:
        """Prometheus text exposition format."""
        return generate_latest(self.registry)


class _CacheCollector:
    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator:
        s = self._stats()
        for name, value, doc in (("hits", s.hits, "Embedding cache hits"),
                                 ("misses", s.misses, "Embedding cache misses (encoder runs)"),
                                 ("coalesced", s.coalesced, "Requests that waited for an encode already running"),
                                 ("evictions", s.evictions, "Embeddings evicted by the byte bound"),
                                 ("failures", s.failures, "Encodes that failed")):
            yield CounterMetricFamily(f"sam_cache_{name}", doc, value=value)
        yield GaugeMetricFamily("sam_cache_bytes", "Bytes held by the embedding cache", value=s.bytes)
        yield GaugeMetricFamily("sam_cache_entries", "Embeddings held", value=s.entries)


class _AdapterAnswers:
    def __init__(self, answers: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._answers = answers

    def collect(self) -> Iterator:
        family = CounterMetricFamily("sam_adapter_clicks", "Clicks of a project's adapted version, by the decoder "
                                     "that answered (adapted, or released where the adapted mask missed the clicks)",
                                     labels=["project", "answer"])
        for project, counts in sorted(self._answers().items()):
            for answer, n in sorted(counts.items()):
                family.add_metric([project, answer], n)
        yield family
