"""Which decoder a project's clicks run: the newest version in the sidecar database (`sidecar.learning`), built
once on the loaded engine and kept until a newer one is published.

Every replica serves the same decoder for a version name: names come from the database (numbered there), and each
replica looks for a newer version at most every `SYNC_S` per project, on that project's next click, so a
publication reaches every replica within `SYNC_S` of its next click. A version learnt on other weights, or whose
bytes cannot be read, is not served (the base model is).

A version's decoder runs on the base's decoder path (`SAM_DECODER`: an ONNX Runtime graph of the adapted weights,
exported in memory and checked against their own eager decoder), so an adapted project clicks as fast as the base.
At start, the versions the database holds are built in the background once the engine is loaded (`Adapters.start`);
a project's first look builds its version where it is needed; every later version is built on a thread of its own
while what served goes on serving, and swapped in when ready: no click waits for a graph export after that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sam_backend.segment.engines import PathChoosing
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
        self._building: dict[str, threading.Thread] = {}  # projects whose newer version is built off the click path

    @property
    def down(self) -> bool:
        """The database failed to answer within the last `DOWN_S`: clicks keep what they have without asking."""
        return time.monotonic() < self._down_until

    def engine_for(self, project: str, base: Any) -> Any:
        """The engine a click of `project` runs: its newest version built on `base`, else `base`."""
        served = self.refresh(project, base)
        return served.engine if served.engine is not None else base

    def refresh(self, project: str, base: Any, force: bool = False) -> Served:
        """Look for a newer version (at most every `sync_s`, unless `force`) and build it on `base`. At a project's
        first look in this process (and on a `force`d refresh, from a background thread) it is built here, so the
        first click after a start gets the version; later, a newer version is built on a thread of its own while
        what served goes on serving, and swapped in when ready: no click waits for its graph.
        Returns what serves now (a copy: a later swap does not change it)."""
        with self._lock:
            served = self.served.setdefault(project, Served())
            first_look = served.checked == float("-inf")  # this process has not served the project yet
            now = time.monotonic()
            stale = served.engine is not None and served.engine.engine_id != base.engine_id
            if not (force or stale or now - served.checked >= self.sync_s) or (self.down and not force):
                return replace(served)
            served.checked = now
            weights = weights_of(base)
            try:
                newest = self.store.newest(project, weights)
            except Exception as exc:  # the database is down: clicks keep what they have, without asking for a while
                self._failed(project, served, exc)
                return replace(served)
            if newest is None or not (newest != served.number or stale or served.engine is None):
                return replace(served)
            if not (first_look or stale or force):  # a click that has an engine to run: built off its path
                if project not in self._building:
                    thread = threading.Thread(target=self._upgrade, args=(project, base, weights, newest),
                                              daemon=True, name=f"version-{project}")
                    self._building[project] = thread
                    thread.start()
                return replace(served)
            self._install(project, served, self._build(project, base, weights, newest))
            return replace(served)

    def _upgrade(self, project: str, base: Any, weights: str, number: int) -> None:
        try:
            built = self._build(project, base, weights, number)
            with self._lock:
                self._install(project, self.served[project], built)
        finally:
            with self._lock:
                self._building.pop(project, None)

    def settle(self) -> None:
        """Wait until no newer version is being built (a call that drives the upgrades to their end)."""
        while True:
            with self._lock:
                threads = list(self._building.values())
            if not threads:
                return
            for thread in threads:
                thread.join()

    def _install(self, project: str, served: Served, built: tuple[Any, int, dict[str, Any]] | None) -> None:
        if built is not None:
            served.engine, served.number, served.info = built
            log.info("project %s: clicks use adapted version %s (%s decoder)", project, served.number,
                     served.engine.decoder_kind)
            self.on_built(project)

    def _failed(self, project: str, served: Served, exc: Exception) -> None:
        self._down_until = time.monotonic() + DOWN_S
        log.warning("project %s: newest version cannot be read (%s); clicks keep version %s", project,
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__,
                    served.number or "base")

    def _build(self, project: str, base: Any, weights: str, number: int
               ) -> tuple[Any, int, dict[str, Any]] | None:
        """Version `number` of `project` built on `base`: `(engine, number, info)`, or None where it cannot be used.
        Its decoder runs on the path the base's runs (`SAM_DECODER`: its own graph, checked against its own eager
        decoder as the base's was); where that graph is refused, eager."""
        from sam_backend.segment.adapt import AdaptError, adapted_decoder, unpack_version

        try:
            found = self.store.version(project, weights, number)
        except Exception as exc:
            self._failed(project, self.served[project], exc)
            return None
        if found is None:
            return None
        try:
            state, meta = unpack_version(found.data)
        except AdaptError as exc:
            log.error("project %s: version %s cannot be used (%s); clicks keep their version", project, number, exc)
            return None
        if meta.get("weights") != weights:
            log.warning("project %s: version %s was learnt on other weights (%s, serving %s); clicks keep their "
                        "version", project, number, meta.get("weights"), weights)
            return None
        engine = base.with_mask_decoder(adapted_decoder(base, state), f"p{project}-v{number}")
        if isinstance(base, PathChoosing) and base.decoder_kind != "eager":
            engine.use_decoder(base.decoder_kind)
        return engine, number, found.info

    def number(self, project: str | None) -> int | None:
        """The version this replica serves for `project` (None: the base model)."""
        served = self.served.get(project) if project is not None else None
        return served.number if served is not None and served.engine is not None else None

    def answers(self) -> dict[str, dict[str, int]]:
        """Clicks the serving version of each project answered since it was built: by its own decoder (`adapted`),
        or by the released one where the adapted mask missed more of the clicks (`released`)."""
        return {p: dict(s.engine.answers) for p, s in list(self.served.items()) if s.engine is not None}
