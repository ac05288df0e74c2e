"""`sam-backend report`: the interaction log joined to what the team accepted in Label Studio.

The join's rule is tested on hand-made log rows and exported tasks (its table of cases); the whole command through
the real Label Studio, with a scripted team whose every object is known, and the page in the real browser.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone

import cv2
import numpy as np
import pytest
from conftest import require_or_skip

from sam_backend.labelstudio.brush import encode_brush
from sam_backend.segment.masks import mask_to_coco
from sam_backend.sidecar.report.figures import percentile, report_data
from sam_backend.sidecar.report.objects import match, since, version_of
from sam_backend.sidecar.report.page import render

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
H, W = 60, 80


def disc(cx: int, cy: int, r: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, -1)
    return mask.astype(bool)


A, B = disc(20, 30, 12), disc(60, 30, 12)


def row(n: int, task: int, label: str, seconds: float, mask: np.ndarray | None, points=(), box=None,
        model_version: str = "sam-vit_t", latency_ms: float = 40.0) -> dict:
    return {"id": n, "created_at": (T0 + timedelta(seconds=seconds)).isoformat(), "project": "1", "task_id": task,
            "label": label, "latency_ms": latency_ms, "model_version": model_version,
            "prompt": {"points": [list(p) for p in points], "box": box, "label": label},
            "coco_annotation": None if mask is None else mask_to_coco(mask, label)}


def region(mask: np.ndarray, label: str, origin: str | None = "prediction", rid: str = "r") -> dict:
    out = {"id": rid, "type": "brushlabels", "original_width": W, "original_height": H,
           "value": {"format": "rle", "rle": encode_brush(mask), "brushlabels": [label]}}
    if origin is not None:
        out["origin"] = origin
    return out


def task(task_id: int, *annotations: tuple[list[dict], float, bool]) -> dict:
    return {"id": task_id, "data": {"image": f"/data/upload/{task_id}.png"},
            "annotations": [{"id": task_id * 10 + k, "result": result, "was_cancelled": cancelled,
                             "created_at": (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z"),
                             "updated_at": (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")}
                            for k, (result, at, cancelled) in enumerate(annotations)]}


def painted(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[25:35, 30:36] = True
    return out


# case → (log rows, tasks, expected per object: (task, label, clicks, kinds, as_answered) or "hand"; unkept runs)
CASES = {
    "one click accepted as answered": (
        [row(1, 1, "Object", 0, A, [(20, 30, 1)])],
        [task(1, ([region(A, "Object")], 10, False))],
        [(1, "Object", 1, ["click"], True)], 0),
    "box, click, negative click, then painted": (
        [row(1, 1, "Object", 0, A, box=[5, 15, 35, 45]), row(2, 1, "Object", 2, A, [(20, 30, 1)], [5, 15, 35, 45]),
         row(3, 1, "Object", 4, A, [(20, 30, 1), (40, 30, 0)], [5, 15, 35, 45])],
        [task(1, ([region(painted(A), "Object", "prediction-changed")], 30, False))],
        [(1, "Object", 3, ["box", "click", "negative click"], False)], 0),
    "two objects of one label: the second starts with one click": (
        [row(1, 1, "Object", 0, A, [(20, 30, 1)]), row(2, 1, "Object", 1, A, [(20, 30, 1), (22, 28, 1)]),
         row(3, 1, "Object", 5, B, [(60, 30, 1)])],
        [task(1, ([region(A, "Object", rid="a"), region(B, "Object", rid="b")], 9, False))],
        [(1, "Object", 2, ["click", "click"], True), (1, "Object", 1, ["click"], True)], 0),
    "drawn by hand (origin manual), though an answer matches": (
        [row(1, 1, "Object", 0, A, [(20, 30, 1)])],
        [task(1, ([region(A, "Object", "manual")], 10, False))],
        ["hand"], 1),
    "no origin and no answer near it: hand-drawn": (
        [row(1, 1, "Object", 0, A, [(20, 30, 1)])],
        [task(1, ([region(B, "Object", None)], 10, False))],
        ["hand"], 1),
    "an answer of another label is not the region's": (
        [row(1, 1, "Background object", 0, A, [(20, 30, 1)])],
        [task(1, ([region(A, "Object")], 10, False))],
        ["hand"], 1),
    "an answer given after the annotation was saved is not its": (
        [row(1, 1, "Object", 60, A, [(20, 30, 1)])],
        [task(1, ([region(A, "Object")], 10, False))],
        ["hand"], 1),
    "cancelled annotation left out; its answers were not kept": (
        [row(1, 1, "Object", 0, A, [(20, 30, 1)])],
        [task(1, ([region(A, "Object")], 10, True))],
        [], 1),
    "a pause longer than the object memory starts a new object": (
        [row(1, 1, "Object", 0, B, [(60, 30, 1)]), row(2, 1, "Object", 700, A, [(60, 30, 1), (20, 30, 1)])],
        [task(1, ([region(A, "Object")], 710, False))],
        [(1, "Object", 1, ["click"], True)], 1),
}


@pytest.mark.parametrize("case", CASES)
def test_the_join_rule(case):
    rows, tasks, expected, unkept = CASES[case]
    matched = match(rows, tasks)
    got = [("hand" if not o.by_backend else (o.task_id, o.label, o.clicks, [s.kind for s in o.steps], o.as_answered))
           for o in matched.objects]
    assert got == expected
    assert len(matched.unkept) == unkept
    assert len(matched.answers) == len(rows)


def test_figures_per_label_and_day_and_since():
    rows = [row(1, 1, "Object", 0, A, [(20, 30, 1)], latency_ms=30),
            row(2, 1, "Object", 1, A, [(20, 30, 1), (21, 31, 1)], latency_ms=50),
            row(3, 2, "Object", 86400, B, [(60, 30, 1)], latency_ms=70),
            row(4, 2, "Background object", 86401, A, [(20, 30, 1)], latency_ms=90)]
    tasks = [task(1, ([region(A, "Object")], 5, False)),
             task(2, ([region(painted(B), "Object", "prediction-changed"), region(A, "Background object",
                                                                            rid="x")], 86410, False))]
    data = report_data(match(rows, tasks), 1, None, [], adapt=False)
    labels = {r["label"]: r for r in data["by_label"]}
    assert labels["Object"]["objects"] == 2 and labels["Object"]["clicks_median"] == 1.5
    assert labels["Object"]["accepted_as_answered"] == 0.5 and labels["Background object"]["answers"] == 1
    assert labels["Object"]["answer_ms_median"] == 50.0
    days = {r["day"]: r for r in data["by_day"]}
    assert sorted(days) == ["2026-12-01", "2026-12-02"] and days["2026-12-01"]["seconds_to_accept_median"] == 5.0
    assert "by_version" not in data
    later = report_data(since(match(rows, tasks), T0 + timedelta(hours=1)), 1, T0, [], adapt=False)
    assert later["totals"]["objects"] == 2 and later["totals"]["answers"] == 2
    assert percentile([1, 2, 3, 4], 90) == 3.7 and percentile([None], 50) is None


def test_adapted_versions_from_the_real_sidecar(tmp_path):
    """Rows as the backend records them (`Store.record`, model versions as `Adapters.model_version_for` names them)
    and a version published through `LearningStore`: the report splits the figures at the version and keeps the
    held-out score it was accepted with. (Training a real version is `test_learning_replicas`' job.)"""
    from sam_backend.sidecar.learning import LearningStore
    from sam_backend.sidecar.records import Interaction
    from sam_backend.sidecar.report.driver import read_log

    db = tmp_path / "sidecar.db"
    from sam_backend.sidecar.store import Store

    store = Store(db)
    held = {"objects": 2, "base": {"noc90": 6.0}, "adapted": {"noc90": 4.5}}
    for n, (version, clicks) in enumerate([(0, 3), (0, 3), (1, 1), (1, 1)]):
        model = "sam-vit_t" if version == 0 else "sam-vit_t-adapted-p7-v1"
        for k in range(clicks):
            points = [[20 + i, 30, 1] for i in range(k + 1)]
            store.record(Interaction("img", {"points": points, "box": None}, A, project="7", task_id=100 + n,
                                     model_version=model, label="Object", latency_ms=40.0,
                                     created_at=(T0 + timedelta(minutes=10 * n, seconds=k)).isoformat()))
        if n == 1:
            LearningStore(store, tmp_path).publish("7", "w", b"decoder", {"held_out": held, "trained_on": 4}, keep=3)
    rows, stored = read_log(str(db), 7)
    tasks = [task(100 + n, ([region(A, "Object")], 600 * n + 60, False)) for n in range(4)]
    data = report_data(match(rows, tasks), 7, None, stored, adapt=True)
    base, v1 = data["by_version"]
    assert (base["version"], base["objects"], base["clicks_median"]) == (0, 2, 3.0)
    assert (v1["version"], v1["objects"], v1["clicks_median"], v1["held_out"]) == (1, 2, 1.0, held)
    assert v1["went_live"] is not None and version_of("sam-vit_t-adapted-p7-v12") == 12
    page = render(data, [40.0])
    assert "Adapted decoder versions" in page and "4.5 (6.0)" in page


def test_an_empty_project_says_so(tmp_path):
    from click.testing import CliRunner

    from sam_backend.commands.cli import main
    from sam_backend.sidecar.store import Store

    Store(tmp_path / "s.db").migrate()
    env = {"SAM_METADATA_DB": str(tmp_path / "s.db"), "LABEL_STUDIO_URL": "http://127.0.0.1:9",
           "LABEL_STUDIO_API_KEY": "k"}
    result = CliRunner(env=env).invoke(main, ["report", "--project", "3", "-o", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code != 0 and "project 3 has no logged interactions" in result.output
    assert not (tmp_path / "r").exists()
    missing = CliRunner(env=dict(env, SAM_METADATA_DB=str(tmp_path / "none.db"))).invoke(
        main, ["report", "--project", "3", "--quiet"])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    bad = CliRunner(env=env).invoke(main, ["report", "--project", "3", "--since", "yesterday", "--quiet"])
    assert bad.exit_code != 0 and "--since: expected a date" in bad.output
    _log_one(tmp_path / "logged.db")
    down = CliRunner(env=dict(env, SAM_METADATA_DB=str(tmp_path / "logged.db"))).invoke(
        main, ["report", "--project", "3", "--quiet"])
    assert down.exit_code != 0 and "Traceback" not in down.output and "project 3" in down.output  # LS unreachable


def _log_one(db) -> None:
    """A sidecar with one interaction of project 3."""
    from sam_backend.sidecar.records import Interaction
    from sam_backend.sidecar.store import Store

    Store(db).record(Interaction("img", {"points": [[1, 1, 1]], "box": None}, A, project="3", task_id=1,
                                 label="Object", latency_ms=5.0))


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    from sam_backend.labelstudio.process import LabelStudio

    server = LabelStudio(tmp_path_factory.mktemp("ls-data"), "admin@example.com", "report-Passw0rd").start()
    yield server
    server.stop()


@pytest.mark.integration
def test_report_of_a_scripted_team_through_label_studio(ls, tmp_path):
    from click.testing import CliRunner
    from team_script import Plan, annotate_project

    from sam_backend.commands.cli import main

    plans = [Plan(0, "Object", ("click",), "as_answered"),
             Plan(0, "Background object", ("box", "click"), "as_answered"),
             Plan(1, "Object", ("click", "click", "negative"), "painted"),
             Plan(1, "Background object", ("click",), "rejected"),
             Plan(2, "Object", ("click",), "hand"), Plan(2, "Background object", ("box",), "as_answered"),
             Plan(3, "Object", ("click",), "deleted"), Plan(4, "Object", ("click", "click"), "cancelled")]
    project, env = annotate_project(ls, tmp_path, plans)
    result = CliRunner(env=env).invoke(main, ["report", "--project", str(project), "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    made = [p for p in plans if p.outcome in ("as_answered", "painted")]
    got = sorted((o["task"], o["label"], o["clicks"], o["accepted_as_answered"]) for o in data["objects"]
                 if o["by_backend"])
    assert got == sorted((p.task_id, p.label, len(p.prompts), p.outcome == "as_answered") for p in made)
    kinds = {(o["task"], o["label"]): [s["kind"] for s in o["steps"]] for o in data["objects"] if o["by_backend"]}
    assert kinds[(plans[1].task_id, "Background object")] == ["box", "click"]
    assert kinds[(plans[2].task_id, "Object")] == ["click", "click", "negative click"]
    painted_iou = next(o["iou_with_last_answer"] for o in data["objects"] if o["task"] == plans[2].task_id)
    assert 0.5 <= painted_iou < 0.99
    totals = data["totals"]
    assert (totals["objects"], totals["hand_drawn"]) == (4, 1)
    # not kept: the rejected suggestion (1 request), the one redrawn by hand (1), the deleted (1) and cancelled (2)
    assert totals["unkept_objects"] == 4 and totals["unkept_requests"] == 5
    assert totals["answers"] == sum(len(p.prompts) for p in plans)
    labels = {r["label"]: r for r in data["by_label"]}
    assert labels["Object"]["objects"] == 2 and labels["Object"]["hand_drawn"] == 1
    assert labels["Background object"]["accepted_as_answered"] == 1.0
    assert all(o["seconds_to_accept"] >= 0 for o in data["objects"] if o["by_backend"])
    check_page_in_browser(tmp_path / "r" / "report.html")


def check_page_in_browser(path) -> None:
    """The page opens in Debian's chromium with no error and shows both figures."""
    if not shutil.which("chromium") and not shutil.which("/usr/bin/chromium"):
        require_or_skip("Debian's chromium is not installed (make test installs it with apt as root)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(path.as_uri())
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.alt, i.naturalWidth])")
            heading = page.inner_text("h1")
        finally:
            browser.close()
    assert errors == []
    assert {alt for alt, width in sizes if width > 300} == {"clicks per object", "answer times"}
    assert "What the team's clicks cost" in heading


def test_metrics_count_prompts_per_accepted_object_by_label(tmp_path):
    """With SAM_ADAPT, each annotation Label Studio confirms (here its stand-in) adds its new regions to `/metrics`:
    the prompts the backend answered for each (by the report's rule), hand-drawn ones apart; an update that only
    repeats a region counts it once."""
    from label_studio_sdk.converter.brush import decode_rle
    from ls_standin import LabelStudioStandIn, brush_region
    from synthetic import disc_scene

    from sam_backend.commands.evaluate import CONFIG, LABEL
    from sam_backend.config import Settings
    from sam_backend.labelstudio.context import keypoint_result
    from sam_backend.serving.app import create_app
    from sam_backend.sidecar.store import AsyncRecorder, Store

    image, truth, (cx, cy, r) = disc_scene(240, 320)
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    ls = LabelStudioStandIn()
    try:
        settings = Settings.from_env({"SAM_ENGINE": "grabcut", "SAM_ADAPT": "true", "LOCAL_FILES_DOCUMENT_ROOT":
                                      str(tmp_path), "SAM_ADAPTER_DIR": str(tmp_path / "locks"),
                                      "SAM_METADATA_DB": str(tmp_path / "sidecar.db"), **ls.env()})
        recorder = AsyncRecorder(Store(settings.metadata_db))
        client = create_app(settings, recorder=recorder).test_client()
        points = []
        for x, y in ((cx, cy), (cx + r // 2, cy)):
            points.append(keypoint_result(x, y, (320, 240), True, LABEL))
            answer = client.post("/predict", json={
                "tasks": [{"id": 40, "data": {"image": "photo.png"}}], "label_config": CONFIG, "project": "6.1",
                "params": {"context": {"result": list(points)}}}).json
        [result] = answer["results"][0]["result"]
        answered = decode_rle(result["value"]["rle"]).reshape(240, 320, 4)[:, :, 3] > 0
        recorder.flush()
        corner = np.zeros_like(truth)
        corner[5:30, 5:40] = True
        body = ls.annotate(6, 1, "photo.png", task=40, regions=[brush_region("a", answered),
                                                                brush_region("b", corner)])
        assert client.post("/webhook", json=body).json["kept"] == 2
        client.post("/webhook", json={**body, "action": "ANNOTATION_UPDATED"})
        metrics = client.get("/metrics").data.decode()
    finally:
        ls.stop()
    assert f'sam_accepted_object_prompts_bucket{{label="{LABEL}",le="2.0"}} 1.0' in metrics
    assert f'sam_accepted_object_prompts_bucket{{label="{LABEL}",le="1.0"}} 0.0' in metrics
    assert f'sam_accepted_objects_total{{label="{LABEL}",made="hand"}} 1.0' in metrics
    assert f'sam_accepted_objects_total{{label="{LABEL}",made="backend"}} 1.0' in metrics


def test_a_hostile_label_is_text_on_the_page_and_in_the_plot():
    """A label is the team's text: `$…$` is not matplotlib's mathtext (an unbalanced one made the plot raise) and
    markup is escaped in the tables."""
    label = "<script>alert(1)</script> $x^{$"
    rows = [row(1, 1, label, 0, A, [(20, 30, 1)])]
    data = report_data(match(rows, [task(1, ([region(A, label)], 10, False))]), 1, None, [], adapt=False)
    page = render(data, [40.0])
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("data:image/png;base64,") == 2
