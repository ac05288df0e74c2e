"""A scripted annotation team working through the real Label Studio and the backend, for `sam-backend report`.

Each task is a photo-like texture with two discs, one per label of `points-and-boxes-brush.xml`. A `Plan` says how one
object is made (its prompts, in the order an annotator gives them through the smart tools) and what becomes of it:
accepted as answered, accepted after painting, rejected, drawn by hand, or saved in an annotation that is then
deleted or cancelled. `run_team` does it through `POST /api/ml/{id}/interactive-annotating` (Label Studio calls the
backend) and saves each task's annotation through Label Studio's API, regions marked with the `origin` the editor
gives them. What the report must find is then known object by object.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from synthetic import textured_background

from sam_backend.labelstudio.brush import encode_brush

W, H = 640, 480
LABELS = ("Object", "Background object")
DISCS = {"Object": (170, 240, 75), "Background object": (470, 240, 75)}  # label → (cx, cy, r) px
COLOURS = {"Object": (230, 120, 30), "Background object": (40, 90, 220)}
OUTCOMES = ("as_answered", "painted", "rejected", "hand", "deleted", "cancelled")


def scene(seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(H, W, 3) uint8 RGB` and each label's disc mask."""
    image = textured_background(H, W, seed)
    masks = {}
    for label, (cx, cy, r) in DISCS.items():
        mask = np.zeros((H, W), np.uint8)
        cv2.circle(mask, (cx, cy), r, 1, -1)
        image[mask > 0] = COLOURS[label]
        masks[label] = mask.astype(bool)
    return image, masks


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Plan:
    """One object: its task (index into the uploaded tasks), label, prompts (`box`, `click`, `negative`) and
    outcome (one of `OUTCOMES`; `hand`: the annotator draws the true mask with the brush, `origin: manual`, whatever
    the prompts answered)."""

    task: int
    label: str
    prompts: tuple[str, ...]
    outcome: str
    task_id: int = 0
    answers: list[dict] = field(default_factory=list)  # the brush region of each answer


def _keypoint(x: float, y: float, label: str, positive: bool, n: int) -> dict:
    return {"original_width": W, "original_height": H, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x / W * 100, "y": y / H * 100, "width": 0.3, "keypointlabels": [label]},
            "id": f"kp{n}", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual"}


def _rectangle(label: str, n: int) -> dict:
    cx, cy, r = DISCS[label]
    x1, y1, x2, y2 = cx - r - 8, cy - r - 8, cx + r + 8, cy + r + 8
    return {"original_width": W, "original_height": H, "image_rotation": 0, "id": f"box{n}", "from_name": "box",
            "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "value": {"x": x1 / W * 100, "y": y1 / H * 100, "width": (x2 - x1) / W * 100,
                      "height": (y2 - y1) / H * 100, "rotation": 0, "rectanglelabels": [label]}}


def _prompt(ls, ml: int, plan: Plan) -> None:
    """Give the plan's prompts as the editor sends them: a rectangle alone; each click with the label's keypoints
    so far (cleared when the object is done)."""
    cx, cy, r = DISCS[plan.label]
    points: list[dict] = []
    spots = [(cx, cy), (cx + r // 2, cy - r // 3), (cx - r // 2, cy + r // 3)]
    for k, prompt in enumerate(plan.prompts):
        if prompt == "box":
            context = [_rectangle(plan.label, k)]
        else:
            x, y = (cx + r + 40, cy) if prompt == "negative" else spots[len(points) % len(spots)]
            points.append(_keypoint(x, y, plan.label, prompt != "negative", k))
            context = list(points)
        answer = ls.interactive(ml, plan.task_id, context)
        if "errors" in answer or not answer.get("data", {}).get("result"):
            raise AssertionError(f"{plan}: no mask for prompt {k} ({answer})")
        plan.answers.append(answer["data"]["result"][0])


def _region(plan: Plan, masks: dict[str, np.ndarray], n: int) -> dict:
    """The brush region the annotator saves for the plan."""
    if plan.outcome == "hand":
        mask, origin = masks[plan.label], "manual"
    else:
        last = plan.answers[-1]
        mask = decode_rle(last["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
        origin = "prediction"
        if plan.outcome == "painted":  # brushed over a rim the model missed, and erased a bit
            cx, cy, r = DISCS[plan.label]
            mask = mask.copy()
            mask[cy - 20:cy + 20, cx + r - 5:cx + r + 25] = True
            mask[cy - r:cy - r + 15, :] = False
            origin = "prediction-changed"
    return {"id": f"region{n}", "type": "brushlabels", "from_name": "tag", "to_name": "image", "origin": origin,
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_brush(mask), "brushlabels": [plan.label]}}


def run_team(ls, ml: int, task_ids: list[int], scenes: list[dict[str, np.ndarray]], plans: list[Plan]) -> None:
    """Do every plan (prompts through Label Studio, then one annotation per task and outcome kind)."""
    for plan in plans:
        plan.task_id = task_ids[plan.task]
        if plan.prompts:
            _prompt(ls, ml, plan)
    for index, task_id in enumerate(task_ids):
        saved = {"kept": [], "deleted": [], "cancelled": []}
        for n, plan in enumerate(p for p in plans if p.task == index):
            if plan.outcome in ("as_answered", "painted", "hand"):
                saved["kept"].append(_region(plan, scenes[index], n))
            elif plan.outcome in ("deleted", "cancelled"):
                saved[plan.outcome].append(_region(plan, scenes[index], n))
        if saved["kept"]:
            ls.call("POST", f"/api/tasks/{task_id}/annotations/", json={"result": saved["kept"]})
        if saved["cancelled"]:
            ls.call("POST", f"/api/tasks/{task_id}/annotations/", json={"result": saved["cancelled"],
                                                                         "was_cancelled": True})
        if saved["deleted"]:
            made = ls.call("POST", f"/api/tasks/{task_id}/annotations/", json={"result": saved["deleted"]}).json()
            ls.call("DELETE", f"/api/annotations/{made['id']}/")


def mixed_plans(objects: int, seed: int = 0) -> list[Plan]:
    """`objects` plans over `ceil(objects / 2)` tasks (one per label each), prompts and outcomes in a fixed
    pseudo-random mix weighted as a team works (most accepted, some painted, a few rejected, hand-drawn, deleted,
    cancelled); a deleted or cancelled plan takes its task's other label too (a task's kept annotation stays whole)."""
    rng = np.random.default_rng(seed)
    prompt_sets = (("click",), ("box",), ("box", "click"), ("click", "click"), ("click", "negative"),
                   ("click", "click", "negative"))
    plans: list[Plan] = []
    for task in range((objects + 1) // 2):
        fate = rng.choice(["kept", "kept", "kept", "kept", "kept", "kept", "deleted", "cancelled"])
        for label in LABELS:
            if len(plans) == objects:
                break
            if fate in ("deleted", "cancelled"):
                outcome = str(fate)
            else:
                outcome = str(rng.choice(["as_answered"] * 6 + ["painted"] * 2 + ["rejected", "hand"]))
            prompts = () if outcome == "hand" else prompt_sets[int(rng.integers(len(prompt_sets)))]
            plans.append(Plan(task, label, prompts, outcome))
    return plans


def annotate_project(ls, tmp_path, plans: list[Plan]) -> tuple[int, dict[str, str]]:
    """A project of `points-and-boxes-brush.xml` annotated by the scripted team through a backend (GrabCut engine, in
    this process, its sidecar in `tmp_path`); returns the project id and the environment `sam-backend report` needs."""
    from conftest import ROOT
    from test_integration_labelstudio import backend_for

    scenes = [scene(seed) for seed in range(max(p.task for p in plans) + 1)]
    backend = backend_for(ls, tmp_path)
    try:
        project = ls.create_project("team", (ROOT / "label_config" / "points-and-boxes-brush.xml").read_text())
        task_ids = ls.upload(project, {f"t{k}.png": png(image) for k, (image, _m) in enumerate(scenes)})
        ml = ls.add_ml_backend(project, backend.url)
        run_team(ls, ml, task_ids, [masks for _image, masks in scenes], plans)
        backend.recorder.flush()
    finally:
        backend.stop()
    return project, {"SAM_METADATA_DB": str(tmp_path / "sidecar.db"), "LABEL_STUDIO_URL": ls.url,
                     "LABEL_STUDIO_API_KEY": ls.pat}
