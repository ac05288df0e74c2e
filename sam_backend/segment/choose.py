"""Which of a decoder's candidate masks answers a click: the one that agrees with the clicks.

SAM's decoder gives four candidates for every prompt (one single-mask token, three multimask tokens). The model's
own choice (the single-mask token after the first click) sometimes ignores the newest corrective click, most often
right after a box, and the mask gets worse although the annotator said where it was wrong. Here the candidate is
chosen by the clicks themselves: first whether the newest click is obeyed (a positive click inside the mask, a
negative one outside), then how many of all the clicks are obeyed, then the model's predicted IoU.

Masks are `(H, W) bool` in image pixels; clicks are pixel `(x, y)` with labels 1 (positive) / 0 (negative).
"""

from __future__ import annotations

import numpy as np

from sam_backend.segment.engines import MaskPrediction
from sam_backend.segment.prompts import ObjectPrompt


def obeyed(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(N,) bool`: whether each click agrees with `mask` (a positive one on it, a negative one off it)."""
    h, w = mask.shape
    if len(points) == 0:
        return np.zeros(0, bool)
    xs = np.clip(points[:, 0].astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].astype(int), 0, h - 1)
    return mask[ys, xs] == (labels == 1)


def choose_candidate(prediction: MaskPrediction, prompt: ObjectPrompt) -> int:
    """Index of the candidate that obeys the newest click, then most clicks, then scores highest."""
    if len(prompt.points) == 0:
        return prediction.best
    keys = []
    for i in range(len(prediction.scores)):
        ok = obeyed(prediction.mask(i), prompt.points, prompt.labels)
        keys.append((bool(ok[-1]), int(ok.sum()), float(prediction.scores[i])))
    return int(max(range(len(keys)), key=keys.__getitem__))
