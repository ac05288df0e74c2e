"""The report's figures: what the team's objects cost, per label, per day and per adapted decoder version.

Every figure is computed from `objects.Matched`: clicks per object (median, 90th percentile), the share of objects
accepted as answered, seconds from the first prompt to the saved annotation, and the backend's answer times in ms
(median, 95th percentile). Percentiles interpolate linearly (numpy's default); a figure with nothing to count is None.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np

from sam_backend.sidecar.report.objects import Matched, Step, TeamObject, parse_time


def percentile(values: Iterable[float | None], q: float) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return round(float(np.percentile(kept, q)), 3) if kept else None


def figures(objects: list[TeamObject], answers: list[Step]) -> dict[str, Any]:
    """The figure set of some objects (hand-drawn ones counted apart) and some answers."""
    made = [o for o in objects if o.by_backend]
    return {
        "objects": len(made),
        "hand_drawn": len(objects) - len(made),
        "clicks_median": percentile((o.clicks for o in made), 50),
        "clicks_p90": percentile((o.clicks for o in made), 90),
        "accepted_as_answered": round(sum(o.as_answered for o in made) / len(made), 3) if made else None,
        "iou_with_last_answer_mean": round(float(np.mean([o.iou for o in made])), 4) if made else None,
        "seconds_to_accept_median": percentile((o.seconds for o in made), 50),
        "answers": len(answers),
        "answer_ms_median": percentile((s.latency_ms for s in answers), 50),
        "answer_ms_p95": percentile((s.latency_ms for s in answers), 95),
    }


def _grouped(matched: Matched, key_object: Callable[[TeamObject], Any], key_answer: Callable[[str | None, Step], Any]
             ) -> dict[Any, dict[str, Any]]:
    objects: dict[Any, list[TeamObject]] = defaultdict(list)
    answers: dict[Any, list[Step]] = defaultdict(list)
    for obj in matched.objects:
        objects[key_object(obj)].append(obj)
    for label, step in matched.answers:
        answers[key_answer(label, step)].append(step)
    keys = sorted(set(objects) | set(answers), key=lambda k: tuple("" if v is None else str(v) for v in
                                                                  (k if isinstance(k, tuple) else (k,))))
    return {k: figures(objects.get(k, []), answers.get(k, [])) for k in keys}


def versions(matched: Matched, stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per decoder version that answered (0: the base model): when it went live (its stored time, else its first
    answer), the held-out score it was accepted with (while the sidecar still keeps it), and its figures."""
    by_version = _grouped(matched, lambda o: o.version, lambda _label, s: s.version)
    first: dict[int, datetime] = {}
    for _label, step in matched.answers:
        number = step.version
        first[number] = min(first.get(number, step.at), step.at)
    kept = {int(v["version"]): v for v in stored}
    out = []
    for number in sorted(set(by_version) | set(kept)):
        info = (kept.get(number) or {}).get("info") or {}
        live = parse_time((kept.get(number) or {}).get("created_at")) or first.get(number)
        out.append({"version": number, "went_live": live.isoformat() if live else None,
                    "held_out": info.get("held_out"), "trained_on": info.get("trained_on"),
                    **by_version.get(number, figures([], []))})
    return out


def report_data(matched: Matched, project: int, since: datetime | None, stored_versions: list[dict[str, Any]],
                adapt: bool) -> dict[str, Any]:
    """Everything `report.json` holds (see the README's "What the team's clicks cost")."""
    unkept_steps = sum(len(run) for run in matched.unkept)
    data: dict[str, Any] = {
        "project": project,
        "since": since.isoformat() if since else None,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "totals": {**figures(matched.objects, [s for _label, s in matched.answers]),
                   "unkept_objects": len(matched.unkept), "unkept_requests": unkept_steps},
        "by_label": [{"label": k, **v} for k, v in _grouped(matched, lambda o: o.label, lambda lab, _s: lab).items()],
        "by_day": [{"day": k, **v} for k, v in _grouped(matched, lambda o: o.day,
                                                          lambda _lab, s: s.at.date().isoformat()).items()],
        "by_label_day": [{"label": k[0], "day": k[1], **v} for k, v in _grouped(
            matched, lambda o: (o.label, o.day), lambda lab, s: (lab, s.at.date().isoformat())).items()],
        "objects": [o.to_json() for o in matched.objects],
        "skipped": matched.skipped,
    }
    if adapt or stored_versions or any(o.version for o in matched.objects):
        data["by_version"] = versions(matched, stored_versions)
    return data
