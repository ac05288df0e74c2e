"""The object memory's rule (box, then clicks), a smart brush stroke as a prompt, and never a silent empty answer.

Tables of requests as Label Studio 1.23.2 sends them: a smart rectangle alone, then the smart keypoints of the
same label without it (the UI filters what it sends by region type).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import load_request
from label_studio_sdk.converter.brush import decode_rle
from synthetic import disc_scene, iou, touching_scene

from sam_backend.config import Settings
from sam_backend.labelstudio.brush import encode_brush
from sam_backend.labelstudio.context import parse_context
from sam_backend.labelstudio.objects import ObjectRule
from sam_backend.segment.engines import MaskPrediction
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend
from sam_backend.serving.memory import ObjectMemory

W, H = 640, 480
CONFIG = load_request("predict.browser-4-smart-rectangle")["label_config"]


def rect(x1, y1, x2, y2, label="Object"):
    value = {"x": x1 / W * 100, "y": y1 / H * 100, "width": (x2 - x1) / W * 100, "height": (y2 - y1) / H * 100,
             "rotation": 0, "rectanglelabels": [label]}
    return {"original_width": W, "original_height": H, "type": "rectanglelabels", "from_name": "box",
            "to_name": "image", "value": value}


def kp(x, y, positive=True, label="Object"):
    return {"original_width": W, "original_height": H, "type": "keypointlabels", "from_name": "kp", "to_name": "image",
            "is_positive": positive, "value": {"x": x / W * 100, "y": y / H * 100, "keypointlabels": [label]}}


def run(requests_, memory=None, enabled=True, where=("e", "img", 1), margin=8):
    """Parse each request's context as the backend does, with the rule; the prompts of each request."""
    memory = memory or ObjectMemory()
    out = []
    for result in requests_:
        rule = ObjectRule(memory, where, enabled, margin)
        prompts = parse_context({"result": result}, image_size=(W, H), remembered_box=rule.box_for,
                                join_margin_px=margin)
        for p in prompts:
            rule.answered(p)
        out.append(prompts)
    return out


BOX = (100, 100, 300, 300)
# (name, requests after the rectangle, expected for the last request: box kept?, its point labels)
RULE_TABLE = [
    ("Alt-click inside the box refines it", [[kp(250, 200, False)]], True, [0]),
    ("positive click inside the box adds to it", [[kp(150, 150)]], True, [1]),
    ("click, then Alt-click: both join the box", [[kp(150, 150)], [kp(150, 150), kp(250, 200, False)]], True, [1, 0]),
    ("positive click outside the box starts a new object", [[kp(400, 350)]], False, [1]),
    ("after a click outside, the old box is forgotten", [[kp(400, 350)], [kp(400, 350), kp(150, 150)]], False, [1, 1]),
    ("points outside the box are dropped when the newest is inside", [[kp(400, 350), kp(150, 150)]], True, [1]),
    ("another label does not join the box", [[kp(150, 150, label="Other")]], False, [1]),
    ("Alt-click just outside the box (a leak) refines it", [[kp(305, 200, False)]], True, [0]),
    ("Alt-click far outside the box still belongs to the current object", [[kp(500, 400, False)]], True, [0]),
    ("positive click within the refinement margin joins the box", [[kp(306, 150)]], True, [1]),
    ("positive click past the margin starts a new object", [[kp(320, 150)]], False, [1]),
    ("click, then Alt-click outside: both join, nothing refused", [[kp(150, 150)], [kp(150, 150), kp(304, 304, False)]],
     True, [1, 0]),
]


@pytest.mark.parametrize(("name", "follow", "boxed", "labels"), RULE_TABLE, ids=[r[0] for r in RULE_TABLE])
def test_the_memory_rule(name, follow, boxed, labels):
    *_, last = run([[rect(*BOX)], *follow])
    [prompt] = last
    assert (prompt.box is not None) == boxed
    if boxed:
        assert prompt.box.tolist() == list(BOX)
    assert prompt.labels.tolist() == labels


def test_a_new_rectangle_replaces_the_remembered_box():
    new_box = (320, 200, 500, 400)
    *_, inside_new = run([[rect(*BOX)], [rect(*new_box)], [kp(400, 300, False)]])
    assert inside_new[0].box.tolist() == list(new_box)  # the Alt-click refines the newest rectangle
    *_, inside_old = run([[rect(*BOX)], [rect(*new_box)], [kp(150, 150)]])
    assert inside_old[0].box is None  # the first box is no longer the current object


def test_a_negative_click_with_nothing_to_refine_keeps_todays_error():
    from sam_backend.segment.prompts import PromptError

    with pytest.raises(PromptError, match="has only negative points"):
        run([[kp(150, 150, False)]])


def test_the_remembered_box_expires():
    import time

    memory = ObjectMemory(box_ttl_s=0.05)
    run([[rect(*BOX)]], memory)
    time.sleep(0.1)
    [[prompt]] = run([[kp(150, 150)]], memory)
    assert prompt.box is None


def test_memory_off_is_todays_behaviour():
    from sam_backend.segment.prompts import PromptError

    *_, last = run([[rect(*BOX)], [kp(150, 150)]], enabled=False)
    assert last[0].box is None
    with pytest.raises(PromptError, match="has only negative points"):
        run([[rect(*BOX)], [kp(250, 200, False)]], enabled=False)


def test_objects_are_kept_per_task_and_image():
    memory = ObjectMemory()
    run([[rect(*BOX)]], memory, where=("e", "img", 1))
    [[other_task]] = run([[kp(150, 150)]], memory, where=("e", "img", 2))
    [[same_task]] = run([[kp(150, 150)]], memory, where=("e", "img", 1))
    assert other_task.box is None and same_task.box is not None


# -- through the HTTP app, GrabCut on a held scene -------------------------------------------------------

def scene_app(tmp_path, env=None, engine_factory=GrabCutEngine):
    scene = touching_scene()
    cv2.imwrite(str(tmp_path / "touching.png"), scene["image"][:, :, ::-1])
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_METADATA_DB": str(tmp_path / "s.db"),
                                  **(env or {})})
    backend = SamBackend(settings, engine_factory=engine_factory, recorder=lambda item: None)
    return create_app(settings, backend=backend).test_client(), backend, scene


def ask(client, result):
    body = {"tasks": [{"id": 5, "data": {"image": "touching.png"}}], "label_config": CONFIG,
            "params": {"context": {"result": result}}}
    return client.post("/predict", json=body)


def mask_of(resp):
    [region] = resp.json["results"][0]["result"]
    return decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0


def test_box_then_alt_click_on_the_neighbour_gives_the_object(tmp_path):
    """Held scene (GrabCut): the box alone leaks into the touching bar, IoU 0.75; the box with one Alt-click on
    the bar, sent alone as Label Studio sends it, gives the disc, IoU 1.00."""
    client, _, scene = scene_app(tmp_path)
    box = ask(client, [rect(*scene["box"])])
    before = iou(mask_of(box), scene["target"])
    refined = ask(client, [kp(*scene["negative"], positive=False)])
    assert refined.status_code == 200, refined.json
    after = iou(mask_of(refined), scene["target"])
    assert before < 0.8 and after >= 0.9, (before, after)


def test_with_the_memory_off_the_alt_click_alone_is_refused(tmp_path):
    client, _, scene = scene_app(tmp_path, {"SAM_OBJECT_MEMORY": "false"})
    assert ask(client, [rect(*scene["box"])]).status_code == 200
    resp = ask(client, [kp(*scene["negative"], positive=False)])
    assert resp.status_code == 422 and "has only negative points" in resp.json["errors"][0]


# -- a smart brush stroke ---------------------------------------------------------------------------------

def stroke_region(mask: np.ndarray) -> dict:
    h, w = mask.shape
    return {"original_width": w, "original_height": h, "type": "brushlabels", "from_name": "tag", "to_name": "image",
            "value": {"format": "rle", "rle": encode_brush(mask), "brushlabels": ["Object"]}}


def test_a_scribble_over_an_object_gives_its_mask(tmp_path):
    image, truth, (cx, cy, r) = disc_scene(H, W)
    cv2.imwrite(str(tmp_path / "touching.png"), image[:, :, ::-1])
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    client = create_app(settings, backend=SamBackend(settings, engine_factory=GrabCutEngine,
                                                     recorder=lambda item: None)).test_client()
    scribble = np.zeros((H, W), np.uint8)
    cv2.line(scribble, (cx - r // 2, cy - r // 3), (cx + r // 2, cy + r // 4), 1, 9)  # a rough stroke inside
    resp = ask(client, [stroke_region(scribble.astype(bool))])
    assert resp.status_code == 200, resp.json
    assert iou(mask_of(resp), truth) >= 0.85 and iou(scribble.astype(bool), truth) < 0.1


def test_a_stroke_reaches_sam_as_the_mask_prompt(tiny_engine):
    image, truth, (cx, cy, r) = disc_scene()
    scribble = np.zeros(truth.shape, bool)
    scribble[cy - 3:cy + 3, cx - r // 2:cx + r // 2] = True
    [prompt] = parse_context({"result": [stroke_region(scribble)]}, image_size=(truth.shape[1], truth.shape[0]))
    assert prompt.stroke is not None and np.array_equal(prompt.stroke, scribble)
    assert all(scribble[int(y), int(x)] for x, y in prompt.points) and len(prompt.points) >= 2
    emb = tiny_engine.embed(image)
    with_stroke = tiny_engine.predict(emb, prompt)
    plain = tiny_engine.predict(emb, type(prompt)(prompt.points, prompt.labels, None, "Object", None, None,
                                                  prompt.image_size))
    assert with_stroke.masks.shape[0] == 1  # a stroke is not ambiguous: one mask
    assert not np.allclose(with_stroke.low_res_logits[0], plain.low_res_logits[0])  # the stroke changed the answer


# -- never a silent empty answer ------------------------------------------------------------------------

class FixedMask(GrabCutEngine):
    """Answers a fixed mask whatever the prompt (a stand-in for a model whose mask refinement would remove)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def predict(self, embedding, prompt, prev_logits=None):
        return MaskPrediction(self.mask[None].copy(), np.array([0.5], np.float32), None)


def test_refinement_that_empties_a_mask_answers_the_unrefined_one_and_counts_it(tmp_path):
    speck = np.zeros((H, W), bool)
    speck[10:20, 10:20] = True  # 100 px away from the click: keep-clicked keeps it, island removal drops it
    client, backend, scene = scene_app(tmp_path, env={"SAM_MIN_ISLAND_PX": "256"},
                                       engine_factory=lambda: FixedMask(speck))
    resp = ask(client, [kp(300, 300)])
    assert resp.status_code == 200 and np.array_equal(mask_of(resp), speck)
    assert "sam_refine_emptied_total 1.0" in backend.metrics.render().decode()


def test_an_empty_model_answer_is_an_error_that_says_so(tmp_path):
    client, _, _ = scene_app(tmp_path, engine_factory=lambda: FixedMask(np.zeros((H, W), bool)))
    resp = ask(client, [kp(300, 300)])
    assert resp.status_code == 422
    assert resp.json["errors"][0].startswith("the model found no object at this prompt (its mask is empty)")


def test_the_smart_tools_config_offers_the_smart_tools_that_send_requests_to_one_brush_output():
    from conftest import ROOT

    from sam_backend.labelstudio.labelconfig import label_interface, parse_label_config

    config = (ROOT / "label_config" / "smart-tools-brush.xml").read_text()
    [target] = parse_label_config(config).targets
    assert (target.output, target.output_type, target.labels) == ("tag", "brushlabels", ("Object", "Background object"))
    smart = {c.tag.lower(): c.attr.get("smart") for c in label_interface(config).controls}
    # the smart brush sends no request in Label Studio 1.2x: the brush is the output, not a promised tool
    assert smart == {"brushlabels": None, "keypointlabels": "true", "rectanglelabels": "true"}


# -- one request that carries boxes and points (an API client, or LS's documented way to mix prompts) ---------

def test_a_negative_point_outside_the_box_in_the_same_request_belongs_to_it():
    [[prompt]] = run([[rect(*BOX), kp(305, 200, False), kp(150, 150)]])
    assert prompt.box.tolist() == list(BOX) and prompt.labels.tolist() == [0, 1]


def test_a_negative_point_goes_to_the_nearest_of_several_boxes():
    other = (400, 100, 500, 200)
    [[a, b]] = run([[rect(*BOX), rect(*other), kp(390, 150, False)]])
    assert a.box.tolist() == list(BOX) and len(a.points) == 0
    assert b.box.tolist() == list(other) and b.labels.tolist() == [0]


def test_a_negative_only_group_never_fails_the_whole_request():
    from sam_backend.segment.prompts import PromptError

    [prompts] = run([[kp(150, 150), kp(400, 350, False, label="Other")]], enabled=False)
    assert [p.label for p in prompts] == ["Object"] and prompts[0].labels.tolist() == [1]
    with pytest.raises(PromptError, match="only negative points"):
        run([[kp(400, 350, False)]], enabled=False)


def test_a_newer_front_end_sending_every_rectangle_gets_only_the_new_one_answered(tmp_path):
    """Newer Label Studio front ends send, for a smart rectangle, every rectangle of the control: the captured
    request's rectangle (answered before) and a new one in one request. Only the new one is answered; a repeat of
    the same request is answered again (the newest), never both."""
    import copy

    captured = load_request("predict.browser-4-smart-rectangle")["params"]["context"]["result"][0]
    client, backend, scene = scene_app(tmp_path)
    x1, y1, x2, y2 = scene["box"]  # the disc and the bar
    old = copy.deepcopy(captured)
    old["value"].update(x=x1 / W * 100, y=y1 / H * 100, width=(x2 - x1) / W * 100, height=(y2 - y1) / H * 100)
    nx1, ny1, nx2, ny2 = 340, 140, 440, 340  # the bar alone
    new = copy.deepcopy(captured)
    new["id"] = "NewRect001"
    new["value"].update(x=nx1 / W * 100, y=ny1 / H * 100, width=(nx2 - nx1) / W * 100, height=(ny2 - ny1) / H * 100)

    def regions(result):
        resp = ask(client, result)
        assert resp.status_code == 200, resp.json
        return resp.json["results"][0]["result"]

    assert len(regions([old])) == 1
    [answer] = regions([old, new])
    mask = decode_rle(answer["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
    ys, xs = np.nonzero(mask)
    assert xs.min() >= nx1 - 9 and xs.max() <= nx2 + 9 and ys.min() >= ny1 - 9  # the new box's answer
    assert len(regions([old, new])) == 1  # a repeated request: the newest again, not both


def test_a_positive_click_on_the_current_answer_past_the_margin_refines_it():
    """The box's answer reaches 40 px past the box (a leak): a positive click there is on the current object's
    mask, so it refines that object instead of starting a new one; past the answer it starts a new one."""
    memory = ObjectMemory()
    rule = ObjectRule(memory, ("e", "img", 1), True, 8)
    [[boxed]] = [parse_context({"result": [rect(*BOX)]}, image_size=(W, H), remembered_box=rule.box_for,
                               join_margin_px=8)]
    answer = np.zeros((H, W), bool)
    answer[100:300, 100:340] = True  # the box is 100..300: the answer leaks to x = 340
    rule.answered(boxed, answer)
    [on_answer] = run([[kp(330, 200)]], memory=memory)[0]
    assert on_answer.box is not None and on_answer.labels.tolist() == [1]
    [elsewhere] = run([[kp(330, 200), kp(400, 200)]], memory=memory)[0]
    assert elsewhere.box is None
