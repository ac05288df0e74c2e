"""`report.html`: one self-contained page (figures as inline PNG, tables) from `figures.report_data`'s dict.

Plots: clicks per object over time (one line per label, the median of the last `WINDOW` objects; each adapted decoder
version marked where it went live) and the backend's answer times (histogram, ms). matplotlib draws them off screen.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from datetime import datetime
from typing import Any

WINDOW = 5  # objects in the running median of the clicks plot
_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}.note{color:#666}"""
_COLUMNS = (("objects", "objects"), ("hand_drawn", "hand-drawn"), ("clicks_median", "clicks / object (median)"),
            ("clicks_p90", "clicks (p90)"), ("accepted_as_answered", "accepted as answered"),
            ("iou_with_last_answer_mean", "IoU with last answer"), ("seconds_to_accept_median", "s to accept (median)"),
            ("answers", "answers"), ("answer_ms_median", "answer ms (median)"), ("answer_ms_p95", "answer ms (p95)"))


def _pyplot() -> Any:
    """matplotlib's pyplot drawing off screen."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_SHARES = {"accepted_as_answered"}


def _cell(value: Any, key: str = "") -> str:
    if value is None:
        return "–"
    if key in _SHARES:
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return html.escape(str(value))


def _table(rows: list[dict[str, Any]], keys: tuple[tuple[str, str], ...]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _key, title in keys)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(key), key)}</td>" for key, _title in keys) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def clicks_plot(data: dict[str, Any]) -> str:
    """Clicks per object over time, one line per label, version changes marked: base64 PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    by_label: dict[str, list[tuple[datetime, int]]] = {}
    for obj in data["objects"]:
        if obj["by_backend"]:
            by_label.setdefault(obj["label"] or "(no label)", []).append(
                (datetime.fromisoformat(obj["steps"][0]["at"]), obj["clicks"]))
    for label, points in sorted(by_label.items()):
        points.sort()
        clicks = [c for _t, c in points]
        running = [statistics.median_high(clicks[max(0, i - WINDOW + 1):i + 1]) for i in range(len(clicks))]
        ax.plot([t for t, _c in points], running, marker="o", markersize=3,
                label=label.replace("$", r"\$"))  # a label is text, never matplotlib's mathtext
    for version in data.get("by_version") or []:
        if version["version"] and version["went_live"]:
            when = datetime.fromisoformat(version["went_live"])
            ax.axvline(when, color="#888", linestyle="--", linewidth=1)
            ax.annotate(f"v{version['version']}", (when, 1), xycoords=("data", "axes fraction"), ha="left", va="top",
                        fontsize=8, color="#555")
    ax.set_ylabel(f"clicks per object (median of {WINDOW})")
    ax.set_xlabel("first prompt (UTC)")
    if by_label:
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    out = _png(fig)
    plt.close(fig)
    return out


def answers_plot(latencies_ms: list[float]) -> str:
    """The backend's answer times (ms), a histogram: base64 PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.0))
    ax.hist(latencies_ms or [0.0], bins=40, color="#4a7fb5")
    ax.set_xlabel("answer time (ms, the backend's own)")
    ax.set_ylabel("requests")
    out = _png(fig)
    plt.close(fig)
    return out


def render(data: dict[str, Any], latencies_ms: list[float]) -> str:
    """The whole page as one HTML string."""
    project = html.escape(str(data["project"]))
    since = f" since {html.escape(data['since'])}" if data.get("since") else ""
    totals = data["totals"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sam-backend report: project {project}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>What the team's clicks cost: project {project}{since}</h1>",
             f"<p class='note'>Generated {html.escape(data['generated_at'])}. {totals['objects']} objects made with "
             f"the backend, {totals['hand_drawn']} regions drawn by hand, {totals['unkept_objects']} suggestions "
             f"nobody kept ({totals['unkept_requests']} requests).</p>",
             "<h2>Overall</h2>", _table([totals], _COLUMNS),
             "<h2>Per label</h2>", _table(data["by_label"], (("label", "label"), *_COLUMNS)),
             "<h2>Per day (UTC)</h2>", _table(data["by_day"], (("day", "day"), *_COLUMNS)),
             "<h2>Per label and day</h2>", _table(data["by_label_day"], (("label", "label"), ("day", "day"),
                                                                          *_COLUMNS))]
    if data.get("by_version") is not None:
        rows = [dict(v, held_out_noc90=_held(v, "noc90"), version=v["version"] or "base") for v in data["by_version"]]
        parts += ["<h2>Adapted decoder versions (SAM_ADAPT)</h2>",
                  "<p class='note'>Each version's objects are those its answers made; the held-out NoC@90 is the "
                  "score it was accepted with, adapted (base).</p>",
                  _table(rows, (("version", "version"), ("went_live", "went live (UTC)"),
                                ("held_out_noc90", "held-out NoC@90"), *_COLUMNS))]
    parts += ["<h2>Clicks per object over time</h2>", f"<img alt='clicks per object' src='data:image/png;base64,"
              f"{clicks_plot(data)}'>", "<h2>Answer times</h2>",
              f"<img alt='answer times' src='data:image/png;base64,{answers_plot(latencies_ms)}'>"]
    if data["skipped"]:
        parts.append("<h2>Not read</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in data["skipped"][:200])
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _held(version: dict[str, Any], key: str) -> str | None:
    held = version.get("held_out") or {}
    adapted, base = (held.get("adapted") or {}).get(key), (held.get("base") or {}).get(key)
    return None if adapted is None else f"{adapted} ({base})"
