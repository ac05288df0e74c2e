"""Label Studio brush RLE ↔ `(H, W) bool` masks, both ways without label-studio-sdk's per-bit Python loops.

Format (thi.ng rle-pack, as label-studio-sdk's `converter.brush` reads and writes it): a 32-bit
value count, a 5-bit word size minus one (8 bits here), four 4-bit run-length field sizes minus
one (3, 4, 8, 16), then tokens: `1, size index (2 bits), run length - 1, value` for a run, or
`0, 00, 000, value` for a single value; zero bits pad to a whole byte (a whole extra byte when
already aligned, as the SDK does). Values are the mask repeated over RGBA, row-major.

The SDK's `encode_rle` builds this bit string in a Python loop per run: ≈0.3 s for a noisy
1024 × 768 mask, which alone broke the click budget. This encoder is byte-identical to it
(tests compare them) and does the same in a few milliseconds.
"""

from __future__ import annotations

import numpy as np

_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 16
_MAX_RUN = 2**16


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate `values[i]` written MSB-first in `widths[i]` bits (each ≤ 32) → `(sum,) uint8` of 0/1."""
    left = (values.astype(np.uint64) << (32 - widths).astype(np.uint64)).astype(">u4")
    bits = np.unpackbits(left.view(np.uint8).reshape(-1, 4), axis=1)
    return bits[np.arange(32)[None, :] < widths[:, None]]


def encode_brush(mask: np.ndarray) -> list[int]:
    """`(H, W) bool` → Label Studio brush RLE bytes (alpha 255 inside the mask, 0 outside)."""
    if mask.ndim != 2:
        raise ValueError(f"mask: expected (H, W), got shape {mask.shape}")
    pixels = mask.reshape(-1).view(np.uint8) if mask.dtype == np.bool_ else mask.reshape(-1) != 0
    n = 4 * pixels.size  # RGBA values
    header = _bits(np.array([n, 7, *(s - 1 for s in _SIZES)], np.uint64), np.array([32, 5, 4, 4, 4, 4]))
    if n == 0:
        out = header
    else:
        # Runs of pixels, 4 values each: the runs of the RGBA values without building them (4 × fewer bytes).
        ends = np.append(np.flatnonzero(pixels[1:] != pixels[:-1]), pixels.size - 1)
        lengths = 4 * np.diff(np.append(-1, ends)).astype(np.int64)
        values = np.where(pixels[ends] != 0, 255, 0).astype(np.uint64)
        # Runs longer than 2**16 are emitted as full 2**16 chunks plus the remainder.
        chunks = np.maximum(0, (lengths - 1) // _MAX_RUN)
        reps = chunks + 1
        tok_values = np.repeat(values, reps)
        tok_lengths = np.full(int(reps.sum()), _MAX_RUN, np.int64)
        last = np.cumsum(reps) - 1
        tok_lengths[last] = lengths - chunks * _MAX_RUN
        size_idx = np.searchsorted(np.array([8, 16, 256]), tok_lengths, side="left")
        size_bits = np.array(_SIZES)[size_idx]
        single = tok_lengths == 1
        flag = np.where(single, 0, 1).astype(np.uint64)
        length_field = np.where(single, 0, tok_lengths - 1).astype(np.uint64)
        size_idx = np.where(single, 0, size_idx)
        size_bits = np.where(single, 3, size_bits)
        code = (((flag << 2 | size_idx.astype(np.uint64)) << size_bits.astype(np.uint64) | length_field) << 8
                | tok_values)
        out = np.concatenate([header, _bits(code, 1 + 2 + size_bits + 8)])
    pad = 8 - out.size % 8
    out = np.concatenate([out, np.zeros(pad, np.uint8)])
    return np.packbits(out).tolist()


DEFAULT_MAX_PIXELS = 50_000_000  # SAM_MAX_IMAGE_PIXELS' default: the largest region a brush RLE may describe


class BrushError(ValueError):
    """A brush RLE that does not decode to a mask of the stated size."""


def declared_values(rle: list[int] | bytes) -> int:
    """The value count a brush RLE's header declares (its first 32 bits), read without decoding anything;
    `BrushError` where there is no 4-byte header."""
    try:
        head = bytes(rle[:4])
    except (ValueError, TypeError, OverflowError) as exc:  # not bytes, or values outside 0-255
        raise BrushError(f"brush RLE cannot be decoded ({exc.__class__.__name__})") from None
    if len(head) < 4:
        raise BrushError(f"brush RLE: expected at least a 4-byte header, got {len(head)} bytes")
    return int.from_bytes(head, "big")


def decode_values(rle: list[int] | bytes) -> np.ndarray:
    """Brush RLE → the flat `uint8` values (RGBA, row-major), as label-studio-sdk's `decode_rle` gives them. It
    allocates what the header declares: `decode_brush` checks that against the region first.

    The SDK turns every byte into a string of bits first (≈0.1–0.3 s for one 1024 × 768 mask, which made it the
    slowest step of `sam-backend evaluate`); this reads each field straight from the bytes. Tests compare the two.
    """
    data = bytes(rle) + bytes(8)
    end_bits = 8 * (len(data) - 8)  # past this the RLE is exhausted: a truncated body is refused, not spun on
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        start = pos >> 3
        chunk = int.from_bytes(data[start:start + 8], "big")
        value = (chunk >> (64 - (pos & 7) - n)) & ((1 << n) - 1)
        pos += n
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    word_mask = (1 << word) - 1
    from_bytes = int.from_bytes
    i = 0
    while i < num:
        if pos >= end_bits:
            raise BrushError(f"brush RLE ends after {i} of its {num} values (truncated)")
        # One 64-bit window holds a whole run token (3 + ≤ 16 + ≤ 32 bits after ≤ 7 bits of offset when
        # word ≤ 8): read its fields with shifts instead of a call per field.
        start, shift = pos >> 3, pos & 7
        window = from_bytes(data[start:start + 8], "big")
        head = (window >> (61 - shift)) & 0b111
        n = sizes[head & 3]
        j = min(num, i + 1 + ((window >> (61 - shift - n)) & ((1 << n) - 1)))
        pos += 3 + n
        if head >> 2:
            if word <= 8:
                out[i:j] = (window >> (61 - shift - n - word)) & word_mask
                pos += word
            else:
                out[i:j] = read(word)
        elif word == 8:  # literal bytes, possibly not byte-aligned: shift them out with numpy
            count, start, shift = j - i, pos >> 3, pos & 7
            raw = np.frombuffer(data, np.uint8, count + 1, start).astype(np.uint16)
            out[i:j] = ((raw[:-1] << shift) | (raw[1:] >> (8 - shift))).astype(np.uint8)
            pos += 8 * count
        else:
            out[i:j] = [read(word) for _ in range(j - i)]
        i = j
    return out


def decode_brush(rle: list[int], width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Label Studio brush RLE → `(H, W) bool` (alpha channel > 0); `BrushError` says what does not fit.

    The region's size (`width × height` ≤ `max_pixels`, SAM_MAX_IMAGE_PIXELS) and the count the RLE's header
    declares are both checked before any array is allocated."""
    if not (isinstance(width, int) and isinstance(height, int)) or width <= 0 or height <= 0:
        raise BrushError(f"brush region: expected a positive integer width and height, got {width!r}×{height!r}")
    if width * height > max_pixels:
        raise BrushError(f"brush region of {width}×{height} = {width * height} pixels is larger than {max_pixels} "
                         "(SAM_MAX_IMAGE_PIXELS)")
    if not isinstance(rle, (list, tuple, bytes, bytearray)):
        raise BrushError(f"brush RLE: expected a list of integers, got {type(rle).__name__}")
    declared = declared_values(rle)
    if declared != width * height * 4:
        raise BrushError(f"brush RLE declares {declared} values, expected {width}x{height}x4 = {width * height * 4}; "
                         "the region does not fit its original_width/height")
    try:
        flat = decode_values(rle)  # exactly the declared count: checked above
    except BrushError:
        raise  # truncated: says so
    except (ValueError, TypeError, OverflowError) as exc:
        raise BrushError(f"brush RLE cannot be decoded ({exc.__class__.__name__})") from None
    return flat.reshape(height, width, 4)[:, :, 3] > 0
