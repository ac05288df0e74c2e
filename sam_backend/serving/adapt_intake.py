"""Webhook intake of `SAM_ADAPT`: a webhook names annotations, Label Studio says what they hold
(`labelstudio.accepted.AnnotationSource`), and the sidecar database keeps it (`sidecar.learning`).

A created or updated annotation's brush regions replace what that annotation gave before; a deleted (404) or
cancelled one removes them (a created or updated one that Label Studio does not hold is also counted
`unverified`). An annotation Label Studio cannot confirm (down, our key refused) changes nothing and is counted
`unverified`; so is a body whose `X-SAM-Webhook-Secret` does not match `SAM_WEBHOOK_SECRET` (checked by the app
before this runs). Nothing here raises: every problem is a `Skip`, counted and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sam_backend.labelstudio.accepted import (
    LEARN_ACTIONS,
    AnnotationSource,
    MaskRecord,
    Skip,
    Unconfirmed,
    read_notice,
)
from sam_backend.sidecar.learning import LearningStore

log = logging.getLogger(__name__)


class Intake:
    """Confirms a webhook's annotations with Label Studio and keeps their masks; `on_skip(project, skip)` counts what
    was not learnt from, `on_changed(project)` is told of each project whose masks changed (the trainer's cue), and
    `on_accepted(masks)` of the regions an annotation gained (the live figures of `/metrics`)."""

    def __init__(self, source: AnnotationSource, store: LearningStore, on_skip: Callable[[str | None, Skip], None],
                 on_changed: Callable[[str], None],
                 on_accepted: Callable[[list[MaskRecord]], None] = lambda masks: None) -> None:
        self.source = source
        self.store = store
        self.on_skip = on_skip
        self.on_changed = on_changed
        self.on_accepted = on_accepted

    def _accepted(self, masks: list[MaskRecord]) -> None:
        if masks:
            try:
                self.on_accepted(masks)
            except Exception:  # figures only: never a failed webhook
                log.exception("counting %d accepted regions for /metrics failed", len(masks))

    def webhook(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """What one webhook changed: `learning` (kept / removed / skipped / nothing), the projects, masks kept and
        removed, and the skips' messages."""
        notice = read_notice(body)
        skipped: list[tuple[str | None, Skip]] = [(None, skip) for skip in notice.skipped]  # (project, skip)
        kept = removed = 0
        projects: set[str] = set()
        for annotation in notice.annotations:
            try:
                confirmed = self.source.confirm(annotation)
            except Unconfirmed as exc:
                skipped.append((None, Skip("unverified", f"annotation {annotation}: {exc}; not learnt from")))
                continue
            except Exception as exc:  # never a 500 for a webhook: the store may be down
                skipped.append((None, Skip("failed", f"annotation {annotation}: {type(exc).__name__}")))
                continue
            skipped += [(confirmed.project, skip) for skip in confirmed.skipped]
            if confirmed.gone and notice.action in LEARN_ACTIONS:  # a created or updated annotation it never held
                skipped.append((None, Skip("unverified", f"{notice.action}: Label Studio holds no annotation "
                                           f"{annotation}; not learnt from")))
            try:
                before = self.store.replace_regions(annotation, confirmed.masks)
                removed += len(before)
            except Exception as exc:  # the sidecar database cannot be written: Label Studio keeps the truth
                skipped.append((confirmed.project, Skip("store_failed", f"annotation {annotation}: the sidecar "
                                                        f"database refused it ({type(exc).__name__}); not learnt "
                                                        "from")))
                continue
            kept += len(confirmed.masks)
            self._accepted([m for m in confirmed.masks if m.region not in before])
            if confirmed.project is not None:
                projects.add(confirmed.project)
        for project, skip in skipped:
            self.on_skip(project, skip)
        for project in sorted(projects):
            self.on_changed(project)
        if notice.annotations or skipped:
            log.info("%s: kept %d accepted masks, removed %d, skipped %d (projects %s)", notice.action or "webhook",
                     kept, removed, len(skipped), ", ".join(sorted(projects)) or "none")
        state = "kept" if kept else "removed" if removed else "skipped" if skipped else "nothing to learn"
        return {"learning": state, "projects": sorted(projects), "kept": kept, "removed": removed,
                "skipped": [skip.message for _, skip in skipped]}
