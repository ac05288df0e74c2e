"""Our brush RLE encoder is byte-identical to label-studio-sdk's and decodes with the SDK's decoder."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from lsexport import tricky_masks

from sam_backend.labelstudio.brush import BrushError, decode_brush, encode_brush

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


@pytest.mark.parametrize("mask", CASES, ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_decoder_equals_the_sdk(mask):
    """`decode_values` is ours for speed; label-studio-sdk's `decode_rle` is the reference."""
    from sam_backend.labelstudio.brush import decode_brush, decode_values

    rle = mask2rle(mask.astype(np.uint8) * 255)
    assert np.array_equal(decode_values(rle), decode_rle(rle))
    assert np.array_equal(decode_brush(rle, mask.shape[1], mask.shape[0]), mask)


def test_literal_tokens_decode_like_the_sdk():
    """A hand-built RLE with literal tokens (flag 0), which the SDK's encoder never writes but the UI's may."""
    bits = format(6, "032b") + format(7, "05b") + "".join(format(s - 1, "04b") for s in (3, 4, 8, 16))
    bits += "0" + "00" + format(2, "03b") + "".join(format(v, "08b") for v in (1, 2, 3))  # 3 literals
    bits += "1" + "00" + format(2, "03b") + format(9, "08b")  # a run of 3 nines
    bits += "0" * (-len(bits) % 8)
    rle = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    from sam_backend.labelstudio.brush import decode_values

    assert decode_values(rle).tolist() == decode_rle(rle).tolist() == [1, 2, 3, 9, 9, 9]


def test_a_truncated_rle_is_a_clear_error():
    from sam_backend.labelstudio.brush import BrushError, decode_brush

    rle = encode_brush(np.ones((10, 10), bool))
    with pytest.raises(BrushError, match="values, expected 12x10x4"):
        decode_brush(rle, 12, 10)


def _claiming(values: int, body: list[int]) -> list[int]:
    """A brush RLE whose 32-bit header claims `values` values, followed by `body`'s tokens."""
    return list(values.to_bytes(4, "big")) + body[4:]


def test_a_header_that_claims_more_than_the_region_holds_is_refused_before_allocating():
    """The count in the header is compared with width × height × 4 before anything is allocated: 2^31 values in a
    few bytes would be 2 GB (tracemalloc sees numpy's allocations)."""
    import tracemalloc

    small = encode_brush(np.ones((48, 64), bool))
    tracemalloc.start()
    try:
        with pytest.raises(BrushError, match="declares 2147483648 values, expected 64x48x4"):
            decode_brush(_claiming(2**31, small), 64, 48)
        with pytest.raises(BrushError, match="SAM_MAX_IMAGE_PIXELS"):
            decode_brush(_claiming(4 * 20000 * 20000, small), 20000, 20000, max_pixels=50_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def test_a_truncated_body_is_refused_not_spun_on():
    """A header that fits its region but tokens that end early: refused at once (the decoder would otherwise read
    zero padding as tokens, one Python step per value)."""
    full = encode_brush(np.random.default_rng(1).random((600, 800)) > 0.5)
    with pytest.raises(BrushError, match="truncated|cannot be decoded"):
        decode_brush(full[: len(full) // 3], 800, 600)
    assert decode_brush(full, 800, 600).shape == (600, 800)
