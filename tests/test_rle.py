"""Our brush RLE encoder is byte-identical to label-studio-sdk's and decodes with the SDK's decoder."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from lsexport import tricky_masks

from sam_backend.labelstudio.brush import encode_brush

rng = np.random.default_rng(7)
CASES = [
    *tricky_masks(),
    np.zeros((50, 70), bool),             # one run
    np.ones((300, 300), bool),            # a run longer than 2**16 values
    rng.random((64, 96)) > 0.5,           # many short runs
    rng.random((40, 40)) > 0.95,          # sparse specks
    np.ones((1, 1), bool),
    np.zeros((2, 2), bool),               # 16 values: header + one token ends on a byte boundary
]


@pytest.mark.parametrize("mask", CASES, ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_identical_to_the_sdk_and_round_trips(mask):
    ours = encode_brush(mask)
    assert ours == mask2rle(mask.astype(np.uint8) * 255)
    decoded = decode_rle(ours).reshape(*mask.shape, 4)
    assert np.array_equal(decoded[:, :, 3] > 0, mask) and (decoded[:, :, 0] == decoded[:, :, 3]).all()


def test_rank_is_checked():
    with pytest.raises(ValueError, match=r"expected \(H, W\)"):
        encode_brush(np.zeros((2, 2, 2), bool))
