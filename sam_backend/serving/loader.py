"""The engine, built once off the request path; a failure is remembered so every request can say why."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from sam_backend.segment.engines import Engine, EngineError

log = logging.getLogger(__name__)


class EngineHolder:
    """Builds the engine from `factory` on first use (or in the background after `start`); thread-safe."""

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

    def peek(self) -> Engine | None:
        """The engine if it is built, else None (never builds it)."""
        return self._engine

    def get(self) -> Engine:
        """The engine; `EngineError` saying why where it cannot be built."""
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
