"""Which decoder a project's clicks run: the newest version in the sidecar database (`sidecar.learning`), built
once on the loaded engine and kept until a newer one is published.

Every replica serves the same decoder for a version name: names come from the database (numbered there), and each
replica looks for a newer version at most every `SYNC_S` per project, on that project's next click, so a
publication reaches every replica within `SYNC_S` of its next click. A version learnt on other weights, or whose
bytes cannot be read, is not served (the base model is).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sam_backend.segment.adapt import AdaptError, adapted_decoder, unpack_version
from sam_backend.sidecar.learning import LearningStore

log = logging.getLogger(__name__)

SYNC_S = 2.0  # how often a replica asks the database for a project's newest version (on that project's clicks)
DOWN_S = 30.0  # after the database failed to answer, clicks do not ask it again for this long


def weights_of(engine: Any) -> str:
    """The weights an engine's id names (`sam/<model>/<digest>`), without its precision."""
    return engine.id.weights_key


@dataclass
class Served:
    """A project's version as built here: its number, info, and the adapted engine (None: base serves)."""

    number: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    engine: Any = None
    checked: float = float("-inf")  # time.monotonic() of the last look at the database


class Versions:
    """Each project's served version (see the module docstring)."""

    def __init__(self, store: LearningStore, sync_s: float = SYNC_S,
                 on_built: Callable[[str], None] = lambda project: None) -> None:
        self.store = store
        self.sync_s = sync_s
        self.on_built = on_built
        self.served: dict[str, Served] = {}
        self._lock = threading.Lock()
        self._down_until = float("-inf")  # time.monotonic() before which the database is not asked

    @property
    def down(self) -> bool:
        """The database failed to answer within the last `DOWN_S`: clicks keep what they have without asking."""
        return time.monotonic() < self._down_until

    def engine_for(self, project: str, base: Any) -> Any:
        """The engine a click of `project` runs: its newest version built on `base`, else `base`."""
        served = self.refresh(project, base)
        return served.engine if served.engine is not None else base

    def refresh(self, project: str, base: Any, force: bool = False) -> Served:
        """Look for a newer version (at most every `sync_s`, unless `force`) and build it on `base`."""
        with self._lock:
            served = self.served.setdefault(project, Served())
            now = time.monotonic()
            stale = served.engine is not None and served.engine.engine_id != base.engine_id
            if not (force or stale or now - served.checked >= self.sync_s) or (self.down and not force):
                return served
            served.checked = now
            weights = weights_of(base)
            try:
                newest = self.store.newest(project, weights)
                if newest is not None and (newest != served.number or stale or served.engine is None):
                    found = self.store.version(project, weights, newest)
                    if found is not None and self._build(served, base, found.number, found.data, found.info,
                                                         project):
                        self.on_built(project)
            except Exception as exc:  # the database is down: clicks keep what they have, without asking for a while
                self._down_until = time.monotonic() + DOWN_S
                log.warning("project %s: newest version cannot be read (%s); clicks keep version %s", project,
                            str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__,
                            served.number or "base")
            return served

    @staticmethod
    def _build(served: Served, base: Any, number: int, data: bytes, info: dict[str, Any], project: str) -> bool:
        try:
            state, meta = unpack_version(data)
        except AdaptError as exc:
            log.error("project %s: version %s cannot be used (%s); clicks keep version %s", project, number, exc,
                      served.number or "base")
            return False
        if meta.get("weights") != weights_of(base):
            log.warning("project %s: version %s was learnt on other weights (%s, serving %s); clicks keep version %s",
                        project, number, meta.get("weights"), weights_of(base), served.number or "base")
            return False
        served.engine = base.with_mask_decoder(adapted_decoder(base, state), f"p{project}-v{number}")
        served.number, served.info = number, info
        log.info("project %s: clicks use adapted version %s", project, number)
        return True

    def number(self, project: str | None) -> int | None:
        """The version this replica serves for `project` (None: the base model)."""
        served = self.served.get(project) if project is not None else None
        return served.number if served is not None and served.engine is not None else None

    def answers(self) -> dict[str, dict[str, int]]:
        """Clicks the serving version of each project answered since it was built: by its own decoder (`adapted`),
        or by the released one where the adapted mask missed more of the clicks (`released`)."""
        return {p: dict(s.engine.answers) for p, s in list(self.served.items()) if s.engine is not None}
