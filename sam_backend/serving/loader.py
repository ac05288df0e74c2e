"""The engine, built once off the request path; a failure is remembered so every request can say why.

A click that arrives while the model loads waits at most its deadline (`wait`), like a click waiting for an encode,
and is then told how long the load has left: the previous load's duration is kept in a small file (`LoadTimes`)
so that a restart can say "about N s left".
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sam_backend.fileio import write_atomic
from sam_backend.segment.engines import EncoderChoosing, Engine, EngineError, paths_of
from sam_backend.serving.encoder import StillEncoding

log = logging.getLogger(__name__)


class LoadTimes:
    """Seconds the last load of a model took, in a JSON file (None: not kept). Unreadable or unwritable: ignored."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def read(self) -> float | None:
        if self.path is None:
            return None
        try:
            seconds = float(json.loads(self.path.read_text())["load_s"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return seconds if seconds > 0 else None

    def write(self, seconds: float) -> None:
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps({"load_s": round(seconds, 3)}).encode())
        except OSError as exc:
            log.debug("could not keep the load time at %s (%s)", self.path, exc)


class ModelLoading(StillEncoding):
    """A click arrived while the model loads and the load did not end within `SAM_CLICK_DEADLINE_S` (503)."""


class EngineHolder:
    """Builds the engine from `factory` on first use (or in the background after `start`); thread-safe.

    With `quick` (a torch-free engine from cached graphs, or None where there is none: `engines.onnx_sam`), a start
    serves from the quick engine within about a second while `factory` builds the full engine in the same
    background load; the full engine then takes over (`stage`: `quick`, then `full`). Clicks never wait for the
    switch; what needs the full engine (learning, an adapted project's clicks) asks `full`.

    `state`: `idle` (not asked for yet), `loading`, `ready` or `failed` (`error` says why)."""

    def __init__(self, factory: Callable[[], Engine], times: LoadTimes | None = None,
                 quick: Callable[[], Engine | None] | None = None) -> None:
        self._factory = factory
        self._quick = quick
        self._lock = threading.Lock()
        self._engine: Engine | None = None  # what serves clicks now (the quick engine, then the full one)
        self._full: Engine | None = None
        self._started = threading.Lock()
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()  # an engine serves, or the load ended
        self._done = threading.Event()  # the full load ended (built or failed)
        self.times = times or LoadTimes(None)
        self.expected_s = self.times.read()
        self.loading_since: float | None = None
        self.load_s: float | None = None  # seconds the full engine took to build
        self.ready_s: float | None = None  # seconds until the first engine served (the quick one, where it did)
        self.error: str | None = None

    def start(self) -> None:
        """Build the engine in the background (once)."""
        with self._started:
            if self._thread is None and self._full is None:
                self._thread = threading.Thread(target=self._try_get, name="engine-load", daemon=True)
                self._thread.start()

    def _try_get(self) -> None:
        with contextlib.suppress(EngineError):  # said by `error` and to every click
            self._load()

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def state(self) -> str:
        if self._engine is not None:
            return "ready"
        if self.loading_since is not None:
            return "loading"
        return "failed" if self.error else "idle"

    @property
    def stage(self) -> str | None:
        """`quick` while the torch-free engine serves, `full` once the full engine does, None before either."""
        if self._engine is None:
            return None
        return "full" if self._engine is self._full else "quick"

    def peek(self) -> Engine | None:
        """The engine serving now if there is one, else None (never builds it)."""
        return self._engine

    @property
    def encoder_kind(self) -> str | None:
        """The image encoder's path (`aoti`, `onnx`, `eager`; see `SAM_ENCODER`), `measuring` while the background
        measurement runs, None before the engine is loaded."""
        engine = self._engine
        if engine is None:
            return None
        kind = paths_of(engine)[0]
        tuning = engine.encoder_tuning if isinstance(engine, EncoderChoosing) else None
        return "measuring" if tuning is not None and tuning.is_alive() and kind == "eager" else kind

    @property
    def decoder_kind(self) -> str | None:
        """The decoder path clicks run (`onnx`, `compile`, `eager`; see `SAM_DECODER`), None before the engine
        is loaded."""
        engine = self._engine
        return None if engine is None else paths_of(engine)[1]

    def for_click(self, deadline_s: float, on_deadline: Callable[[], object] = lambda: None,
                  full: bool = False) -> Engine:
        """The engine for a click (the full one where `full`): while it loads, a click waits at most `deadline_s`
        (`SAM_CLICK_DEADLINE_S`), then gets `ModelLoading` (503) with the time the load has left, as a click waiting
        for an encode does."""
        engine = self.full(deadline_s) if full else self.wait(deadline_s)
        if engine is None:
            on_deadline()
            raise ModelLoading.left("model loading", self.seconds_left())
        return engine

    def seconds_left(self) -> float | None:
        """Estimate of the seconds the running load has left, from the previous load's duration (None: unknown)."""
        if self.loading_since is None or self.expected_s is None:
            return None
        return max(1.0, self.expected_s - (time.monotonic() - self.loading_since))

    def wait(self, timeout_s: float | None) -> Engine | None:
        """The engine serving now, waiting at most `timeout_s` for a load in progress (started here if none is);
        None if none serves then. `EngineError` where it cannot be built (a failed load is tried again here, so a
        checkpoint downloaded since is picked up)."""
        return self._wait(self._serving, timeout_s, lambda: self._engine)

    def full(self, timeout_s: float | None) -> Engine | None:
        """The full engine (learning, adapted decoders), waiting at most `timeout_s` (None: until it is built); None
        if it is still loading then, `EngineError` where it cannot be built."""
        return self._wait(self._done, timeout_s, lambda: self._full)

    def _wait(self, event: threading.Event, timeout_s: float | None, current: Callable[[], Engine | None]
              ) -> Engine | None:
        if current() is not None:
            return current()
        if self.error is not None and self.loading_since is None:
            self._load()  # a failed load is tried again
        else:
            self.start()
            event.wait(timeout_s)
        if current() is not None:
            return current()
        if self.error is not None and self.loading_since is None:
            raise EngineError(self.error)
        return None

    def get(self) -> Engine:
        """The engine serving now, waiting for the load where none serves yet (the quick engine where there is one,
        without waiting for the full one); `EngineError` saying why where it cannot be built."""
        engine = self.wait(None)
        if engine is None:  # a retry of a failed load is running: it ends with an engine or an error
            with self._lock:
                engine = self._engine
        if engine is None:
            raise EngineError(self.error or "the engine is not loaded")
        return engine

    def _load(self) -> None:
        """Build the quick engine (where one is given and can be had), then the full one; `EngineError` where
        neither serves."""
        with self._lock:
            if self._full is not None:
                return
            self.loading_since = started = time.monotonic()
            self._done.clear()
            if self._engine is None:
                self._serving.clear()
            try:
                if self._engine is None and self._quick is not None:
                    self._serve_quick(started)
                full = self._factory()
                self.error = None
                self.load_s = time.monotonic() - started
                self.times.write(self.load_s)
                self._full = self._engine = full
                if self.ready_s is None:
                    self.ready_s = self.load_s
                log.info("model ready in %.1f s%s", self.load_s, "" if self.ready_s == self.load_s else
                         f" (served from the cached graphs since {self.ready_s:.1f} s)")
            except EngineError as exc:
                self.error = str(exc)
                log.error("engine not available: %s", exc)
                if self._engine is None:
                    raise
            except Exception as exc:
                self.error = f"engine failed to load ({exc.__class__.__name__}: {exc})"
                log.exception("engine failed to load")
                if self._engine is None:
                    raise EngineError(self.error) from None
            finally:
                self.loading_since = None
                self._done.set()
                self._serving.set()

    def _serve_quick(self, started: float) -> None:
        """Serve from the quick engine where it can be built (any failure: the full load goes on alone)."""
        try:
            quick = self._quick()
        except Exception as exc:
            log.warning("no torch-free start (%s: %s)", type(exc).__name__, exc)
            return
        if quick is None:
            return
        self._engine = quick
        self.ready_s = time.monotonic() - started
        self._serving.set()
        log.info("ready in %.1f s from the cached ONNX graphs (torch-free); the full model loads in the background",
                 self.ready_s)
