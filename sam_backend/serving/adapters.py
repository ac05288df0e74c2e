"""Per-project adapted decoders (`SAM_ADAPT=true`): accepted masks in, better decoder versions out, off the click
path. This module puts the rooms together and is what the backend and the app talk to:

- **Intake** (`serving.adapt_intake`): a webhook names annotations; Label Studio, asked with the backend's own key,
  says what they hold; the sidecar database keeps it. Nothing a client posts is learnt unless Label Studio confirms it.
- **Trainer** (`serving.adapt_trainer`): one background thread, nice 19, one trainer per project across replicas;
  a version replaces the current one unless it does worse on held-out masks (`Scores.kept_over`).
- **Versions** (`serving.adapt_versions`): the newest version in the database is what every replica's clicks run.
- **Truth** (`sidecar.learning`): accepted masks, versions and trainings in the sidecar database (SQLite on one host,
  PostgreSQL for replicas); `SAM_ADAPTER_DIR` holds only the SQLite trainers' lock files.

`Activity` counts clicks in flight, for the trainer to wait for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sam_backend.config import ConfigError, Settings
from sam_backend.labelstudio.accepted import AnnotationSource, Skip, positive_id
from sam_backend.segment.engines import Adaptable
from sam_backend.serving.adapt_intake import Intake
from sam_backend.serving.adapt_trainer import LearningEmbeddings, Trainer
from sam_backend.serving.adapt_versions import Versions, weights_of
from sam_backend.sidecar.learning import LearningStore

log = logging.getLogger(__name__)

QUIET_S = 0.3  # a training step waits this long after the last click


class Activity:
    """Clicks in flight, for background learning to wait for (`wait_idle`)."""

    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self.quiet_s = quiet_s
        self._cond = threading.Condition()
        self._clicks = 0
        self._last = 0.0

    @contextmanager
    def click(self) -> Iterator[None]:
        with self._cond:
            self._clicks += 1
        try:
            yield
        finally:
            with self._cond:
                self._clicks -= 1
                self._last = time.monotonic()
                self._cond.notify_all()

    def wait_idle(self, busy: Callable[[], bool] = lambda: False, stop: threading.Event | None = None) -> bool:
        """Block while a click runs, within `quiet_s` of the last one, or while `busy()`; True where it waited."""
        waited = False
        with self._cond:
            while not (stop is not None and stop.is_set()):
                quiet = time.monotonic() - self._last
                if self._clicks == 0 and quiet >= self.quiet_s and not busy():
                    break
                waited = True
                self._cond.wait(timeout=0.5 if self._clicks or quiet >= self.quiet_s else self.quiet_s - quiet)
        return waited


class Adapters:
    """Learning from accepted masks, as the backend sees it (see the module docstring). Collaborators: the engine
    holder (`engine.full`, `engine.peek`), the embeddings' caches and encoder, clicks in flight, prewarm's queue and
    the metrics — passed in, never the backend itself."""

    def __init__(self, settings: Settings, *, engine: Any, metrics: Any, activity: Activity,
                 busy: Callable[[], bool], embeddings: LearningEmbeddings,
                 source: AnnotationSource | None = None, store: LearningStore | None = None) -> None:
        self.settings = settings
        self.enabled = settings.adapt
        self.engine = engine
        self.metrics = metrics
        self.activity = activity
        self.busy = busy
        self.skipped: dict[str, int] = {}
        self._checked: tuple[Any, bool] = (None, False)  # the last engine asked about, and whether it is Adaptable
        self._lock = threading.Lock()
        self.store = store
        self.intake: Intake | None = None
        self.trainer: Trainer | None = None
        self.versions: Versions | None = None
        if not self.enabled:
            return
        problem = settings.learning_problem()
        if problem is not None:
            raise ConfigError(problem)
        if self.store is None:
            from sam_backend.sidecar.store import open_sidecar

            self.store = LearningStore(open_sidecar(settings.metadata_db), settings.adapter_dir)
        if source is None:
            from sam_backend.labelstudio.client import LabelStudioClient

            source = AnnotationSource(LabelStudioClient(settings.label_studio_url or "",
                                                        settings.label_studio_api_key),
                                      settings.max_image_pixels)
        self.versions = Versions(self.store, on_built=self._update_metrics)
        self.intake = Intake(source, self.store, self._skip, self._changed, self._accepted)
        self.trainer = Trainer(settings, self.store, self._base, embeddings,
                               lambda stop: self.activity.wait_idle(self.busy, stop), metrics,
                               on_version=self._published, on_skip=self._skip)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the training thread, with every project the database has (only with `SAM_ADAPT=true`)."""
        if self.trainer is None or self.store is None:
            return
        try:
            projects = self.store.projects()
        except Exception as exc:  # the database is down: projects are looked at on their next webhook
            log.warning("learning: the sidecar database cannot be read (%s)", type(exc).__name__)
            projects = []
        self.trainer.start(projects)
        if projects:
            threading.Thread(target=self._prebuild, args=(projects,), daemon=True, name="versions-prebuild").start()

    def _prebuild(self, projects: list[str]) -> None:
        """Build the projects' served versions as soon as the engine is loaded (their graphs included), so that the
        first clicks after a start find them built."""
        base = self._base()
        if base is None or self.versions is None or not self._adaptable(base):
            return
        for project in projects:
            try:
                self.versions.refresh(project, base, force=True)
            except Exception as exc:  # never fatal: the project's next click looks again
                log.warning("project %s: its version could not be built at start (%s)", project, type(exc).__name__)

    def stop(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()

    def settle(self, timeout_s: float | None = None) -> bool:
        """Block until no training is queued or running (a call that drives learning to completion)."""
        return True if self.trainer is None else self.trainer.settle(timeout_s)

    # -- intake -----------------------------------------------------------------------------------------------
    def webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        """Learn what Label Studio confirms of an annotation webhook (never raises)."""
        if self.intake is None:
            return {"learning": "off (SAM_ADAPT=false)"}
        return self.intake.webhook(body)

    def refuse(self, message: str) -> None:
        """Count a webhook refused before it was read (a wrong or missing `X-SAM-Webhook-Secret`)."""
        self._skip(None, Skip("unverified", message))

    def _skip(self, project: str | None, skip: Skip) -> None:
        with self._lock:
            self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
        self.metrics.adapt_skipped.labels(skip.reason).inc()
        log.warning("project %s: not learnt from: %s", project or "?", skip.message)

    def _changed(self, project: str) -> None:
        self._update_metrics(project)
        if self.trainer is not None:
            self.trainer.queue(project)

    def _accepted(self, masks: list[Any]) -> None:
        """Newly accepted regions into `/metrics` (prompts per accepted object by label; hand-drawn counted apart)."""
        from sam_backend.sidecar.report.live import clicks_of_accepted

        for label, clicks in clicks_of_accepted(self.store.db, masks):
            self.metrics.observe_accepted(label, clicks)

    def _published(self, project: str) -> None:
        base = self.engine.peek()
        if base is not None and self.versions is not None:
            self.versions.refresh(project, base, force=True)
        self._update_metrics(project)

    def _base(self) -> Any:
        """The loaded engine (waiting for its load), or None where it cannot be loaded."""
        try:
            return self.engine.full(None)
        except Exception as exc:  # EngineError: clicks say why; learning waits for the next webhook
            log.warning("learning from accepted masks waits for the model (%s)", exc)
            return None

    # -- the click path ---------------------------------------------------------------------------------------
    def _adaptable(self, base: Any) -> bool:
        """`isinstance(base, Adaptable)`, asked once per engine (a protocol check reads every member: ~10 µs, and
        each click asks it several times)."""
        if base is None:
            return False
        if base is not self._checked[0]:
            self._checked = (base, isinstance(base, Adaptable))
        return self._checked[1]

    def may_adapt(self, project: str | None) -> bool:
        """Whether a click of `project` may run an adapted decoder (learning on, a Label Studio project): it then
        needs the full engine (a torch-free start's engine cannot adapt)."""
        return self.versions is not None and positive_id(project) is not None

    def engine_for(self, project: str | None, base: Any) -> Any:
        """The engine a click of `project` runs: its adapted version, else `base`."""
        if not self.may_adapt(project) or not self._adaptable(base):
            return base
        return self.versions.engine_for(str(project), base)

    def model_version_for(self, project: str | None, base_version: str) -> str:
        """`base_version` plus `-adapted-p<project>-v<N>` where a version of the project serves clicks."""
        number = self._number(project)
        return base_version if number is None else f"{base_version}-adapted-p{project}-v{number}"

    def _number(self, project: str | None) -> int | None:
        if not self.may_adapt(project):
            return None
        base = self.engine.peek()
        if self._adaptable(base):
            self.versions.refresh(str(project), base)
        return self.versions.number(project)

    def versions_of(self, project: str | None, base_version: str) -> list[str]:
        """Every model version this project's adapted decoders have had (their predictions are this backend's own):
        up to the one this replica serves, looked up at most every `SYNC_S` (a task opened asks this)."""
        return [f"{base_version}-adapted-p{project}-v{n}" for n in range(1, (self._number(project) or 0) + 1)]

    def all_versions(self, base_version: str) -> list[str]:
        """The model versions of every project's adapted decoders (for `/versions`)."""
        if self.store is None:
            return []
        try:
            projects = self.store.projects()
        except Exception:
            return []
        return [v for project in projects for v in self.versions_of(project, base_version)]

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What `/health` shows: per project the version, masks kept and learnt from, held-out scores, state."""
        if self.trainer is None or self.store is None or self.versions is None:
            return {"enabled": False}
        base = self.engine.peek()
        weights = weights_of(base) if self._adaptable(base) else None
        projects: dict[str, Any] = {}
        answers = self.versions.answers()
        try:
            if self.versions.down:  # /health answers at once while the database does not
                raise ConnectionError("down")
            names = self.store.projects()
            for name in names:
                training = self.store.training(name, weights) if weights else None
                served = self.versions.served.get(name)
                info = served.info if served is not None and served.engine is not None else {}
                projects[name] = {
                    "version": self.versions.number(name) if weights else None,
                    "newest_version": self.store.newest(name, weights) if weights else None,
                    "accepted_masks": self.store.mask_count(name), "state": self.trainer.states.get(name, "idle"),
                    "learnt_from": info.get("trained_on", 0), "held_out": info.get("held_out"),
                    "trained_s": info.get("seconds"), "last_attempt": training.last_attempt if training else None,
                    "retry_at": training.retry_at if training and training.retry_at else None,
                    "clicks": answers.get(name, {"adapted": 0, "released": 0})}
            error = None
        except Exception as exc:
            error = f"the sidecar database cannot be read ({type(exc).__name__})"
        with self._lock:
            skipped = dict(self.skipped)
        return {"enabled": True, "projects": projects, "skipped": skipped, "error": error,
                "paused_steps": self.trainer.paused_steps, "unsupported": self.trainer.unsupported}

    def answers(self) -> dict[str, dict[str, int]]:
        """Clicks each project's serving version answered (for `/metrics`)."""
        return {} if self.versions is None else self.versions.answers()

    def _update_metrics(self, project: str) -> None:
        m = self.metrics
        try:
            m.adapter_masks.labels(project).set(self.store.mask_count(project) if self.store else 0)
        except Exception:
            return
        served = self.versions.served.get(project) if self.versions is not None else None
        if served is None or served.engine is None:
            return
        m.adapter_version.labels(project).set(served.number or 0)
        m.adapter_learnt.labels(project).set(served.info.get("trained_on", 0))
        held = served.info.get("held_out") or {}
        for model in ("base", "adapted"):
            if isinstance(held.get(model), dict):
                m.adapter_noc90.labels(project, model).set(held[model]["noc90"])
                m.adapter_miou.labels(project, model).set(held[model]["miou5"])
