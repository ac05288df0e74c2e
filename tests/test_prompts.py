"""Label Studio context → ObjectPrompt: the captured requests, and tables of good and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from conftest import load_request

from sam_backend.labelstudio.context import parse_context
from sam_backend.segment.prompts import ObjectPrompt, PromptError


def kp(x, y, label="Object", positive=None, where="result", w=640, h=480, name="kp"):
    item = {"original_width": w, "original_height": h, "type": "keypointlabels", "from_name": name,
            "to_name": "image", "value": {"x": x, "y": y, "width": 0.3, "keypointlabels": [label]}}
    if positive is not None:
        if where == "result":
            item["is_positive"] = positive
        else:
            item["value"]["positive"] = positive
    return item


def rect(x, y, w_, h_, label="Object", rotation=0, w=640, h=480):
    return {"original_width": w, "original_height": h, "type": "rectanglelabels", "from_name": "box",
            "to_name": "image", "value": {"x": x, "y": y, "width": w_, "height": h_, "rotation": rotation,
                                          "rectanglelabels": [label]}}


def test_captured_single_click():
    body = load_request("predict.browser-1-click")
    [p] = parse_context(body["params"]["context"])
    v = body["params"]["context"]["result"][0]["value"]
    assert p.points.shape == (1, 2)
    np.testing.assert_allclose(p.points[0], [v["x"] / 100 * 640, v["y"] / 100 * 480], rtol=1e-6)
    assert p.labels.tolist() == [1] and p.box is None
    assert (p.label, p.from_name, p.to_name, p.image_size) == ("Object", "kp", "image", (640, 480))


def test_captured_alt_click_is_negative_in_the_same_object():
    body = load_request("predict.browser-3-alt-click-negative")
    [p] = parse_context(body["params"]["context"])
    assert p.labels.tolist() == [1, 1, 0]
    assert p.without_last_point().labels.tolist() == [1, 1]


def test_captured_rectangle_to_pixel_xyxy():
    body = load_request("predict.context-rectanglelabels")
    [p] = parse_context(body["params"]["context"])
    np.testing.assert_allclose(p.box, [0.0625 * 640, 0.0833 * 480, (0.0625 + 0.156) * 640, (0.0833 + 0.167) * 480],
                               rtol=1e-5)
    assert len(p.points) == 0 and p.from_name == "tag3"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (kp(10, 10), 1),  # a missing flag means positive
        (kp(10, 10, positive=True), 1),
        (kp(10, 10, positive=False), 0),
        (kp(10, 10, positive=False, where="value"), 0),  # older Label Studio: value.positive
        (kp(10, 10, positive=True, where="value"), 1),
    ],
)
def test_positive_flag_sources(item, expected):
    ctx = {"result": [kp(50, 50, positive=True), item]}
    [p] = parse_context(ctx)
    assert p.labels.tolist() == [1, expected]


def test_decoded_size_differs_scales_to_real_pixels():
    [p] = parse_context({"result": [kp(50, 25)]}, image_size=(1280, 960))
    np.testing.assert_allclose(p.points[0], [640, 240])
    assert p.image_size == (1280, 960)


def test_rotated_rectangle_becomes_its_bounding_box():
    # 90° clockwise about the top-left corner (x, y): the box swings to the left of x, below y.
    [p] = parse_context({"result": [rect(50, 10, 10, 20, rotation=90)]})
    x0, y0, wp, hp = 320, 48, 64, 96
    np.testing.assert_allclose(p.box, [x0 - hp, y0, x0, y0 + wp], atol=1e-3)


def test_several_objects_boxes_take_their_points():
    ctx = {"result": [
        rect(10, 10, 20, 20, label="Cat"),
        rect(60, 60, 20, 20, label="Dog"),
        kp(15, 15, label="Cat"),                    # inside the Cat box
        kp(70, 70, label="Dog", positive=False),    # negative inside the Dog box
        kp(50, 5, label="Cat"), kp(52, 6, label="Cat"),  # outside any box: one loose Cat object
        kp(90, 40, label="Bird"),                   # another loose object
    ]}
    prompts = parse_context(ctx)
    assert [(p.label, len(p.points), p.box is not None) for p in prompts] == [
        ("Cat", 1, True), ("Dog", 1, True), ("Cat", 2, False), ("Bird", 1, False)]
    assert prompts[1].labels.tolist() == [0]


def test_point_in_nested_boxes_goes_to_the_smallest():
    prompts = parse_context({"result": [rect(0, 0, 90, 90), rect(40, 40, 10, 10), kp(45, 45)]})
    assert [len(p.points) for p in prompts] == [0, 1]


@pytest.mark.parametrize(("context", "needle"), [
    ({"result": [kp(50, 50, positive=False)]}, "only negative"),
    ({"result": [kp(150, 50)]}, "value.x"),
    ({"result": [kp(-3, 50)]}, "value.x"),
    ({"result": [kp(math.nan, 50)]}, "finite"),
    ({"result": [kp(50, math.inf)]}, "finite"),
    ({"result": [kp("50", 50)]}, "expected a number"),
    ({"result": [rect(10, 10, 0, 20)]}, "positive width and height"),
    ({"result": [rect(90, 10, 20, 20)]}, "past the image"),
    ({"result": [{k: v for k, v in kp(5, 5).items() if k != "original_width"}]}, "original_width"),
    ({"result": [dict(kp(5, 5), original_height=0)]}, "original_height"),
    ({"result": [dict(kp(5, 5), value=[1, 2])]}, "value: expected an object"),
    ({"result": [{"type": "brushlabels", "value": {}, "original_width": 64, "original_height": 48}]},
     "value.rle: expected Label Studio brush RLE"),
    ({"result": "nope"}, "expected a list"),
    ({"result": [kp(5, 5), kp(6, 6, w=800)]}, "disagree"),
    ({"result": [dict(kp(5, 5), is_positive="maybe")]}, "is_positive"),
])
def test_bad_input_names_the_field(context, needle):
    with pytest.raises(PromptError, match=needle):
        parse_context(context)


@pytest.mark.parametrize("context", [None, {}, {"result": []}, {"result": None}])
def test_empty_context_is_no_prompt(context):
    assert parse_context(context) == []


def test_object_prompt_validates_itself():
    with pytest.raises(PromptError, match="differ in length"):
        ObjectPrompt(np.zeros((2, 2)), np.ones(1), None, None, None, None, (10, 10))
    with pytest.raises(PromptError, match="x1 < x2"):
        ObjectPrompt(np.zeros((0, 2)), np.zeros(0), np.array([5, 5, 5, 9]), None, None, None, (10, 10))


def test_parse_does_not_mutate_the_request():
    body = load_request("predict.browser-3-alt-click-negative")
    before = copy.deepcopy(body)
    parse_context(body["params"]["context"])
    assert body == before
