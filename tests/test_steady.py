"""The collapse guard: a corrective click whose seeded answer abandons a good mask gets a steady answer instead.

The case comes from real weights (MobileSAM, GrabCut `153077`, box then clicks: a negative click on a thin leak
turned a mask of IoU 0.97 into one of 0.25). Whether a given photo collapses depends on the CPU's arithmetic, so
here a scripted engine stands in for the model (its answers are fixed masks; GrabCut encodes): what is under test is
what the backend does with such answers.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import load_request

from sam_backend.config import Settings
from sam_backend.labelstudio.brush import decode_brush
from sam_backend.segment.engines import MaskPrediction
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.segment.steady import collapsed, logits_iou, obeys
from sam_backend.serving.backend import SamBackend

N = 256
CONFIG = load_request("predict.browser-4-smart-rectangle")["label_config"]


def square(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((N, N), bool)
    m[y1:y2, x1:x2] = True
    return m


BOX_ANSWER = square(40, 40, 210, 200)  # the box's answer, leaking right of the box (x 200..210)
SLIVER = square(100, 100, 112, 110)  # a collapse: another, tiny thing
CORRECTED = square(40, 40, 200, 200)  # the leak removed


class ScriptedEngine(GrabCutEngine):
    """Answers by the prompt alone: a box → BOX_ANSWER (score 0.95); box + click seeded with the previous logits →
    SLIVER (score 0.6); box + click unseeded → `unseeded` (score 0.9). Logits ±8, at the image's resolution."""

    def __init__(self, unseeded: np.ndarray) -> None:
        super().__init__()
        self.unseeded = unseeded

    def predict(self, embedding, prompt, prev_logits=None) -> MaskPrediction:
        if len(prompt.points) == 0:
            mask, score = BOX_ANSWER, 0.95
        elif prev_logits is not None:
            mask, score = SLIVER, 0.6
        else:
            mask, score = self.unseeded, 0.9
        logits = np.where(mask, 8.0, -8.0).astype(np.float32)
        return MaskPrediction(mask[None], np.array([score], np.float32), logits[None])


def _rect(x1, y1, x2, y2):
    value = {"x": x1 / N * 100, "y": y1 / N * 100, "width": (x2 - x1) / N * 100, "height": (y2 - y1) / N * 100,
             "rotation": 0, "rectanglelabels": ["Object"]}
    return {"original_width": N, "original_height": N, "type": "rectanglelabels", "from_name": "box",
            "to_name": "image", "value": value}


def _kp(x, y, positive):
    return {"original_width": N, "original_height": N, "type": "keypointlabels", "from_name": "kp",
            "to_name": "image", "is_positive": positive, "value": {"x": x / N * 100, "y": y / N * 100,
                                                                   "keypointlabels": ["Object"]}}


def _answers(tmp_path, engine, refine=True) -> tuple[list[np.ndarray], SamBackend]:
    image = np.full((N, N, 3), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "p.png"), image)
    settings = Settings.from_env({"SAM_ENGINE": "grabcut", "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
                                  "SAM_REFINE": "true" if refine else "false", "SAM_BOX_MARGIN_PX": "12"})
    backend = SamBackend(settings, engine_factory=lambda: engine)
    masks = []
    for result in ([_rect(40, 40, 200, 200)], [_kp(205, 120, False)]):
        body = {"tasks": [{"id": 1, "data": {"image": "p.png"}}], "label_config": CONFIG,
                "params": {"context": {"result": result}}}
        region = backend.predict(body)["results"][0]["result"][0]
        masks.append(decode_brush(region["value"]["rle"], N, N))
    return masks, backend


def _count(backend, answer: str) -> float:
    return backend.metrics.collapses.labels(answer)._value.get()


def test_the_collapse_rule():
    big = np.where(BOX_ANSWER, 8.0, -8.0)
    assert logits_iou(big, big) == 1.0 and logits_iou(np.where(SLIVER, 8.0, -8.0), big) < 0.01
    assert collapsed(np.where(SLIVER, 8.0, -8.0), big, 0.6)
    assert not collapsed(np.where(SLIVER, 8.0, -8.0), big, 0.9)  # the model is sure: a legitimate big change
    assert not collapsed(np.where(CORRECTED, 8.0, -8.0), big, 0.6)  # a correction keeps most of the mask
    assert obeys(CORRECTED, np.array([205.0, 120.0]), False) and not obeys(BOX_ANSWER, np.array([205.0, 120.0]), False)


def test_a_collapse_is_answered_by_the_steady_unseeded_mask(tmp_path):
    (box_mask, click_mask), backend = _answers(tmp_path, ScriptedEngine(unseeded=CORRECTED))
    assert box_mask.sum() > 0.9 * BOX_ANSWER.sum()
    assert (click_mask == CORRECTED).all()  # not the sliver
    assert _count(backend, "unseeded") == 1 and _count(backend, "previous") == 0


def test_when_nothing_steady_obeys_the_previous_mask_stays(tmp_path):
    (box_mask, click_mask), backend = _answers(tmp_path, ScriptedEngine(unseeded=SLIVER))
    assert (click_mask == box_mask).all()  # the annotator's mask is kept, not destroyed
    assert _count(backend, "previous") == 1


@pytest.mark.parametrize("unseeded", [CORRECTED, SLIVER])
def test_the_plain_predictor_has_no_guard(tmp_path, unseeded):
    """SAM_REFINE=false is the model alone (as upstream SamPredictor): its collapse is answered as it is."""
    (_, click_mask), backend = _answers(tmp_path, ScriptedEngine(unseeded=unseeded), refine=False)
    assert (click_mask == SLIVER).all()
    assert _count(backend, "unseeded") == _count(backend, "previous") == 0
