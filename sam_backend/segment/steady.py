"""A corrective click must not wreck a good mask: the collapse guard.

With the previous answer's logits as its mask prompt, SAM's decoder now and then answers one corrective click with
a different object: after a box, a negative click on a thin leak can turn a mask of IoU 0.97 into a sliver of 0.25
(MobileSAM, GrabCut `153077`). Such an answer keeps little of the previous one and the model itself doubts it.
`collapsed` tells it apart from a legitimate change. Only negative clicks are guarded: a negative click takes a part
away, so an answer that keeps less than half of the mask is not what it asked for, whereas a positive click may
rightly grow a part into the whole object (guarding those too cost clicks on Berkeley).

What the backend answers then (`serving.backend`): the model's answer to the same prompt without the previous
logits, where that one is steady and obeys the newest click; else the previous answer stays (the click changes
nothing, as a refused click would, instead of destroying the mask).

Logits are low-res `(h, w) float32` (mask where > 0); masks `(H, W) bool`; points pixel `(x, y)`.
"""

from __future__ import annotations

import numpy as np

MIN_OVERLAP = 0.5  # low-res IoU with the previous answer below this: the answer is not a correction of it
MIN_SCORE = 0.8  # ... and the model's predicted IoU below this: it doubts the answer


def logits_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the masks (`> 0`) of two low-res logit maps of one shape."""
    ma, mb = a > 0, b > 0
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)


def collapsed(logits: np.ndarray, previous: np.ndarray, score: float) -> bool:
    """Whether an answer (`logits`, predicted IoU `score`) to a corrective click abandons the `previous` answer."""
    return score < MIN_SCORE and logits_iou(logits, previous) < MIN_OVERLAP


def obeys(mask: np.ndarray, point: np.ndarray, positive: bool) -> bool:
    """Whether a click agrees with `mask`: a positive click on it, a negative one off it."""
    h, w = mask.shape
    x, y = int(np.clip(point[0], 0, w - 1)), int(np.clip(point[1], 0, h - 1))
    return bool(mask[y, x]) == positive
