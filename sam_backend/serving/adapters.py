"""Per-project adapted decoders (`SAM_ADAPT=true`): accepted masks in, better decoder versions out, off the click
path.

- **In**: `Adapters.webhook(body)` takes Label Studio's annotation webhooks (`labelstudio.accepted`) and keeps each
  project's accepted brush masks in `SAM_ADAPTER_DIR/<project>/masks.json` (COCO RLE, the image URL, the annotation;
  an update replaces what its annotation gave, a cancelled or deleted one removes it). What cannot be learnt from is
  skipped, logged and counted (`skipped` in `/health`, `sam_adapt_skipped_total`).
- **Learning**: one background thread, at the lowest CPU priority (nice 19), trains a project once it has
  `SAM_ADAPT_MIN_MASKS` accepted masks and again after every `SAM_ADAPT_EVERY` new ones (`segment.adapt`). Every
  fifth accepted mask (by arrival) is held out and never trained on. Embeddings come from the cache, or from one
  encode at the lowest priority of the encoder's gate (below clicks and prewarm). Before each step it waits while a
  click is in flight or prewarm work is queued: it never delays a click by more than one step (≈ 0.1 s of CPU, at
  nice 19).
- **Versions**: a trained decoder replaces the current one only where it does better on the held-out masks
  (`Scores.better_than`: NoC@90, then mIoU, never more failures); else the project keeps what it has (the base
  model at first). A version is `v<N>.pt` plus `current.json` in the project's folder, each written atomically; a
  restart loads it (`serving.adapter_store`). With a shared store (`SAM_EMBEDDING_STORE`), a new version is
  published there and other replicas take it (and keep it in their own folder) within `SYNC_S`.
- **Out**: `engine_for(project, base)` is the engine a click of that project runs (same embeddings, the adapted
  decoder); `model_version_for(project)` names its version; `status()` is what `/health` shows per project.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.accepted import Skip, read_webhook
from sam_backend.segment.adapt import (
    AdaptConfig,
    AdaptError,
    Example,
    adapt,
    adapted_decoder,
    pack_version,
    split_held_out,
    unpack_version,
)
from sam_backend.serving.adapter_store import ProjectFolder, SharedVersions, mask_record, record_mask, weights_of

log = logging.getLogger(__name__)

QUIET_S = 0.3  # a training step waits this long after the last click
SYNC_S = 5.0  # how often a replica looks for a newer version in the shared store
LEARN = 2  # the encoder gate's priority for learning's encodes: after clicks (0) and background prewarm (1)


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


@dataclass
class ProjectAdapter:
    """One project's accepted masks and its current version."""

    project: str
    folder: ProjectFolder
    masks: list[dict[str, Any]] = field(default_factory=list)  # records, in arrival order
    version: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # current.json
    engine: Any = None  # the adapted engine of `version` (None: the base)
    attempted_at: int = 0  # accepted masks when the last training started
    state: str = "idle"  # idle | queued | training
    last_attempt: dict[str, Any] | None = None


class Adapters:
    """Every project's adapter, the webhook intake and the training thread (see the module docstring)."""

    def __init__(self, settings: Settings, backend: Any) -> None:
        self.settings = settings
        self.backend = backend  # SamBackend: engine holder, embeddings, metrics, store, activity
        self.root = Path(settings.adapter_dir)
        self.enabled = settings.adapt
        self.projects: dict[str, ProjectAdapter] = {}
        self.skipped: dict[str, int] = {}
        self.paused_steps = 0
        self._lock = threading.RLock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced: dict[str, float] = {}
        self._known: set[str] = set()  # projects set up or clicked in (see `note_project`)
        self._unsupported: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Read the kept projects and start the training thread (only with `SAM_ADAPT=true`)."""
        if not self.enabled or self._thread is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("SAM_ADAPTER_DIR=%s cannot be created (%s): learning from accepted masks is off", self.root, exc)
            self.enabled = False
            return
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.isdigit()):
            self._project(folder.name)
        self._thread = threading.Thread(target=self._run, name="adapt", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put("")

    # -- intake -----------------------------------------------------------------------------------------------
    def webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        """Keep the accepted masks of an annotation webhook; returns what was kept and skipped (never raises)."""
        if not self.enabled:
            return {"learning": "off (SAM_ADAPT=false)"}
        found = read_webhook(body)
        for skip in found.skipped:
            self._skip(found.project, skip)
        if found.project is None:
            return {"learning": "skipped", "skipped": [s.message for s in found.skipped]}
        if (found.masks or found.annotations) and not self._is_known(found.project):
            skip = Skip("unknown_project", f"{found.action}: project {found.project} is not one this backend serves "
                        "(not set up, clicked in or kept here, and not in Label Studio)")
            self._skip(found.project, skip)
            return {"learning": "skipped", "project": found.project, "skipped": [skip.message]}
        with self._lock:
            p = self._project(found.project)
            before = len(p.masks)
            gone = {str(a) for a in found.annotations}
            p.masks = [r for r in p.masks if str(r.get("annotation")) not in gone]
            removed = before - len(p.masks)
            p.masks.extend(mask_record(m) for m in found.masks)
            if found.masks or removed:
                p.folder.write_masks(p.masks)
            due = self._due(p)
        if due:
            self._queue_training(p)
        log.info("project %s: %s kept %d accepted masks, removed %d, skipped %d (%d kept in all)", found.project,
                 found.action, len(found.masks), removed, len(found.skipped), len(p.masks))
        return {"learning": "training queued" if due else "kept", "project": found.project,
                "accepted_masks": len(p.masks), "kept": len(found.masks), "skipped": [s.message for s in found.skipped]}

    def note_project(self, project: str | None) -> None:
        """A project Label Studio set up with this backend or clicked in (its webhooks are learnt from)."""
        if project is not None and project.isdigit():
            self._known.add(project)

    def _is_known(self, project: str) -> bool:
        """Set up or clicked in here, kept in `SAM_ADAPTER_DIR`, or (with `LABEL_STUDIO_URL` and an API key) a
        project Label Studio has; where Label Studio cannot be asked, a project of its webhook is taken as known."""
        if project in self._known or project in self.projects or (self.root / project).is_dir():
            return True
        url, key = self.settings.label_studio_url, self.settings.label_studio_api_key
        if not (url and key):
            return False
        from sam_backend.labelstudio.client import LabelStudioClient

        try:
            status = LabelStudioClient(url, key).call("GET", f"/api/projects/{project}/", check=False,
                                                      timeout=5).status_code
        except Exception as exc:  # Label Studio unreachable: its own webhook is believed
            log.warning("project %s: Label Studio cannot be asked whether it exists (%s); taken as known", project,
                        type(exc).__name__)
            return True
        if status == 200:
            self._known.add(project)
        return status == 200

    def _skip(self, project: str | None, skip: Skip) -> None:
        with self._lock:
            self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
        self.backend.metrics.adapt_skipped.labels(skip.reason).inc()
        log.warning("project %s: not learnt from: %s", project or "?", skip.message)

    def _due(self, p: ProjectAdapter) -> bool:
        n = len(p.masks)
        if n < self.settings.adapt_min_masks or p.state != "idle":
            return False
        return p.attempted_at == 0 or n - p.attempted_at >= self.settings.adapt_every

    def _queue_training(self, p: ProjectAdapter) -> None:
        with self._lock:
            if p.state != "idle":
                return
            p.state = "queued"
        self._queue.put(p.project)

    # -- the click path ---------------------------------------------------------------------------------------
    def engine_for(self, project: str | None, base: Any) -> Any:
        """The engine a click of `project` runs: its adapted version, else `base`."""
        if not self.enabled or project is None or not hasattr(base, "with_mask_decoder"):
            return base
        p = self.projects.get(project)
        if self.backend.store is not None:
            self._sync_later(project)
        if p is None or p.version is None:
            return base
        if p.engine is None or p.engine.engine_id != base.engine_id:  # not built yet, or the base changed
            self._load_version(p, base)
        return p.engine if p.engine is not None and p.engine.engine_id == base.engine_id else base

    def model_version_for(self, project: str | None, base_version: str) -> str:
        """`base_version` plus `-adapted-p<project>-v<N>` where a version of the project serves clicks."""
        p = self.projects.get(project) if self.enabled and project is not None else None
        if p is None or p.engine is None:
            return base_version
        return f"{base_version}-adapted-p{p.project}-v{p.version}"

    def versions_of(self, project: str | None, base_version: str) -> list[str]:
        """Every model version this project's adapted decoders have had (their predictions are this backend's own)."""
        p = self.projects.get(project) if project is not None else None
        return [f"{base_version}-adapted-p{project}-v{n}" for n in range(1, (p.version or 0) + 1)] if p else []

    def all_versions(self, base_version: str) -> list[str]:
        """The model versions of every project's adapted decoders (for `/versions`)."""
        return [v for project in sorted(self.projects) for v in self.versions_of(project, base_version)]

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What `/health` shows: per project the version, masks kept and learnt from, held-out scores, state."""
        if not self.enabled:
            return {"enabled": False}
        with self._lock:
            projects = {}
            for name, p in sorted(self.projects.items()):
                projects[name] = {
                    "version": p.version, "accepted_masks": len(p.masks), "state": p.state,
                    "learnt_from": p.info.get("trained_on", 0), "held_out": p.info.get("held_out"),
                    "trained_s": p.info.get("seconds"), "last_attempt": p.last_attempt,
                    "clicks": self._answers(p)}
            return {"enabled": True, "dir": str(self.root), "projects": projects, "skipped": dict(self.skipped),
                    "paused_steps": self.paused_steps, "unsupported": self._unsupported}

    @staticmethod
    def _answers(p: ProjectAdapter) -> dict[str, int]:
        """Clicks the serving version answered since it was loaded: by its own decoder (`adapted`), or by the
        released one where the adapted mask missed more of the clicks (`released`)."""
        return dict(getattr(p.engine, "answers", None) or {"adapted": 0, "released": 0})

    def answers(self) -> dict[str, dict[str, int]]:
        """`_answers` of every project with a version (for `/metrics`)."""
        with self._lock:
            return {name: self._answers(p) for name, p in self.projects.items() if p.version is not None}

    # -- files ------------------------------------------------------------------------------------------------
    def _project(self, project: str) -> ProjectAdapter:
        with self._lock:
            p = self.projects.get(project)
            if p is not None:
                return p
            p = ProjectAdapter(project, ProjectFolder(self.root, project))
            self.projects[project] = p
            p.masks = p.folder.read_masks()
            info = p.folder.read_current()
            if info is not None:
                p.info, p.version = info, int(info["version"])
                p.attempted_at = int(info.get("accepted_masks", 0) or 0)
                p.last_attempt = info.get("last_attempt")
            self._update_metrics(p)
            return p

    def _load_version(self, p: ProjectAdapter, base: Any) -> None:
        """Build the adapted engine of `p.version` on `base` (once the engine is loaded)."""
        if p.version is None or (p.engine is not None and p.engine.engine_id == base.engine_id):
            return
        path = p.info.get("file", f"v{p.version}.pt")
        try:
            state, meta = unpack_version(p.folder.read_version(path))
            if meta.get("weights") != weights_of(base):
                log.warning("project %s: version %s was learnt on other weights (%s, serving %s); serving the base "
                            "model", p.project, p.version, meta.get("weights"), weights_of(base))
                return
            p.engine = base.with_mask_decoder(adapted_decoder(base, state), f"p{p.project}-v{p.version}")
            log.info("project %s: clicks use adapted version %s (%s)", p.project, p.version, path)
        except (OSError, AdaptError) as exc:
            log.error("project %s: version file %s cannot be used (%s); serving the base model", p.project, path, exc)

    def _update_metrics(self, p: ProjectAdapter) -> None:
        m = self.backend.metrics
        m.adapter_version.labels(p.project).set(p.version or 0)
        m.adapter_masks.labels(p.project).set(len(p.masks))
        m.adapter_learnt.labels(p.project).set(p.info.get("trained_on", 0))
        held = p.info.get("held_out") or {}
        for model in ("base", "adapted"):
            if isinstance(held.get(model), dict):
                m.adapter_noc90.labels(p.project, model).set(held[model]["noc90"])
                m.adapter_miou.labels(p.project, model).set(held[model]["miou5"])

    # -- shared store -----------------------------------------------------------------------------------------
    def _sync_later(self, project: str) -> None:
        now = time.monotonic()
        if now - self._synced.get(project, -SYNC_S) < SYNC_S:
            return
        self._synced[project] = now
        threading.Thread(target=self._sync, args=(project,), name="adapt-sync", daemon=True).start()

    def _sync(self, project: str) -> None:
        """Take a newer version of `project` from the shared store, if another replica published one."""
        base = self.backend.engine.peek()
        if base is None or self.backend.store is None or not hasattr(base, "with_mask_decoder"):
            return
        p = self._project(project)
        found = SharedVersions(self.backend.store).newer(weights_of(base), project, p.version or 0)
        if found is None:
            self._load_version(p, base)
            return
        version, data, info = found
        self._install(p, base, version, data, info, publish=False)

    # -- training ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # nice 19 for this thread only (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        base = self._base()
        for p in list(self.projects.values()):
            if base is not None and self._supported(base):
                self._load_version(p, base)
            if self._due(p):
                self._queue_training(p)
        while not self._stop.is_set():
            project = self._queue.get()
            if not project or self._stop.is_set():
                break
            p = self.projects[project]
            try:
                self._train(p)
            except Exception:  # a failed training never stops learning for other projects, nor serving
                if self._stop.is_set():
                    break
                log.exception("project %s: training failed; clicks keep version %s", project, p.version or "base")
                self.backend.metrics.adapt_trainings.labels("failed").inc()
            finally:
                with self._lock:
                    p.state = "idle"
                    due = self._due(p)
                if due:
                    self._queue_training(p)

    def _busy(self) -> bool:
        return self.backend.prewarm.pending > 0

    def _pause(self) -> None:
        if self.backend.activity.wait_idle(self._busy, self._stop):
            self.paused_steps += 1
            self.backend.metrics.adapt_paused.inc()
        if self._stop.is_set():
            raise AdaptError("stopped")

    def _examples(self, p: ProjectAdapter, base: Any, records: list[dict[str, Any]]) -> list[Example]:
        out = []
        for record in records:
            self._pause()
            try:
                _, embedding, _ = self.backend.embedding(record["image"], base, priority=LEARN)
            except ClientError as exc:
                self._skip(p.project, Skip("image_unreadable", f"{record['key']}: {exc.message}"))
                continue
            mask = record_mask(record)
            try:
                out.append(Example(embedding, mask, key=record["key"]))
            except AdaptError as exc:
                self._skip(p.project, Skip(exc.reason, f"{record['key']}: {exc} (image {record['image']})"))
        return out

    def _supported(self, base: Any) -> bool:
        """Whether `base` has a SAM mask decoder to adapt; where not, `/health` says so (logged once)."""
        if hasattr(base, "with_mask_decoder"):
            return True
        if self._unsupported is None:
            self._unsupported = (f"{type(base).__name__} has no SAM mask decoder to adapt; learning needs "
                                 "SAM_ENGINE=sam (vit_t, vit_b, vit_l, vit_h)")
            log.warning("SAM_ADAPT=true: %s; accepted masks are kept, not learnt from", self._unsupported)
        return False

    def _base(self) -> Any:
        """The loaded engine (waiting for its load), or None where it cannot be loaded."""
        try:
            return self.backend.engine.wait(None)
        except Exception as exc:  # EngineError: clicks say why; learning waits for the next webhook
            log.warning("learning from accepted masks waits for the model (%s)", exc)
            return None

    def _train(self, p: ProjectAdapter) -> None:
        base = self._base()
        if base is None:
            return
        if not self._supported(base):
            return
        with self._lock:
            p.state = "training"
            records = list(p.masks)
            p.attempted_at = len(records)
        train_records, held_records = split_held_out(records)
        self.backend.metrics.adapt_training.set(1)
        t0 = time.perf_counter()
        try:
            train = self._examples(p, base, train_records)
            held = self._examples(p, base, held_records)
            if len(train) < 2 or not held:
                log.info("project %s: %d usable accepted masks to train on and %d to judge on; waiting for more",
                         p.project, len(train), len(held))
                return
            steps = min(4 * self.settings.adapt_steps, self.settings.adapt_steps + 10 * max(0, len(train) - 5))
            config = AdaptConfig(steps=steps)
            outcome = adapt(base, train, held, config, pause=self._pause)
        finally:
            self.backend.metrics.adapt_training.set(0)
        seconds = time.perf_counter() - t0
        attempt = {"accepted": outcome.accepted, "trained_on": len(train), "held_out_objects": len(held),
                   "base": outcome.base.to_json() if outcome.base else None,
                   "adapted": outcome.adapted.to_json() if outcome.adapted else None,
                   "seconds": round(seconds, 1), "steps": steps, "at": time.time()}
        self.backend.metrics.adapt_trainings.labels("accepted" if outcome.accepted else "refused").inc()
        self.backend.metrics.adapt_seconds.observe(seconds)
        if not outcome.accepted:
            log.info("project %s: the new decoder did not do better on %d held-out masks (NoC@90 %.2f against "
                     "%.2f, mIoU %.3f against %.3f); clicks keep version %s", p.project, len(held),
                     outcome.adapted.noc90, outcome.base.noc90, outcome.adapted.miou5, outcome.base.miou5,
                     p.version or "base")
            with self._lock:
                p.last_attempt = attempt
                info = dict(p.info, last_attempt=attempt, accepted_masks=len(records))
                if p.version is not None:
                    p.info = info
                    p.folder.write_current(info)
            return
        version = (p.version or 0) + 1
        info = {"version": version, "file": f"v{version}.pt", "weights": weights_of(base), "trained_on": len(train),
                "accepted_masks": len(records), "held_out": {"objects": len(held), "base": attempt["base"],
                                                              "adapted": attempt["adapted"]},
                "seconds": attempt["seconds"], "steps": steps, "created": time.time(), "last_attempt": attempt}
        data = pack_version(outcome.state, {"weights": weights_of(base), "project": p.project, "version": version,
                                            "trained_on": len(train)})
        self._install(p, base, version, data, info, publish=True)
        log.info("project %s: version %d serves clicks (learnt from %d masks in %.1f s; held-out NoC@90 %s → %s)",
                 p.project, version, len(train), seconds, (attempt["base"] or {}).get("noc90"),
                 (attempt["adapted"] or {}).get("noc90"))

    def _install(self, p: ProjectAdapter, base: Any, version: int, data: bytes, info: dict[str, Any],
                 publish: bool) -> None:
        """Write version `version` (file, then `current.json`), serve it, and publish it to the shared store."""
        info = dict(info, version=version, file=f"v{version}.pt")
        if not p.folder.write_version(info["file"], data):
            log.error("project %s: clicks keep version %s", p.project, p.version or "base")
            return
        with self._lock:
            p.version, p.info, p.engine = version, info, None
            p.last_attempt = info.get("last_attempt")
            p.folder.write_current(info)
            self._load_version(p, base)
            self._update_metrics(p)
        if publish and self.backend.store is not None:
            SharedVersions(self.backend.store).publish(weights_of(base), p.project, version, data, info)
