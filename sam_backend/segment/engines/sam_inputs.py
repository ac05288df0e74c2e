"""SAM's input frame in numpy: the image resized and padded for the encoder, prompts moved into that frame, the
decoder graph's feed, and a chosen mask brought back to the photo. No torch: the torch engine (`engines.sam`) and the
torch-free start (`engines.onnx_sam`) build a click's inputs with the same functions.

Frames: the photo is `(H, W)` pixels; the encoder's input frame is a square of `side` pixels (1024 for every
published SAM) holding the photo resized so that its longest side is `side` (`input_size` `(h, w)`), padded at the
bottom and right; the decoder's low-res logits are `(4g, 4g)` over that square (`g` = side / 16, the feature grid).
The arithmetic is segment-anything's (`ResizeLongestSide`, `Sam.preprocess`, `Sam.postprocess_masks`), checked equal
in the tests.
"""

from __future__ import annotations

import numpy as np

from sam_backend.segment.engines import MaskPrediction, stroke_logits

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # SAM's and MobileSAM's, RGB
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
NO_LABEL, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1.0, 2.0, 3.0  # the decoder graph's point labels besides 0/1 clicks


def input_size(height: int, width: int, side: int) -> tuple[int, int]:
    """`(h, w)` of a `height × width` photo resized so that its longest side is `side` (rounded as SAM rounds)."""
    scale = side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest(image: np.ndarray, side: int) -> np.ndarray:
    """`(H, W, 3) uint8` → `(h, w, 3) uint8`, longest side `side`, bilinear (PIL's, as `ResizeLongestSide`)."""
    from PIL import Image

    h, w = input_size(image.shape[0], image.shape[1], side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def encoder_pixels(resized: np.ndarray, side: int) -> np.ndarray:
    """`(h, w, 3) uint8 RGB` → `(1, 3, side, side) float32`: normalized by SAM's mean and std, zero-padded."""
    out = np.zeros((1, 3, side, side), np.float32)
    h, w = resized.shape[:2]
    out[0, :, :h, :w] = ((resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)
    return out


def to_input_frame(coords: np.ndarray, original: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """`(..., 2)` pixel `(x, y)` in the `original` `(H, W)` photo → the same points in the resized `size` `(h, w)`
    (float32)."""
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= size[1] / original[1]
    out[..., 1] *= size[0] / original[0]
    return out.astype(np.float32)


def prompt_arrays(prompt: object, original: tuple[int, int], size: tuple[int, int], side: int, grid: int,
                  prev_logits: np.ndarray | None = None
                  ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """One `ObjectPrompt` in the encoder's input frame: `(points (N, 2) float32 or None, labels (N,) int32 or None,
    box (4,) float32 XYXY or None, mask input (1, 1, 4g, 4g) float32 or None)`. The mask input is `prev_logits`
    (`(4g, 4g)`, else `EngineError`), else the prompt's scribble resized and padded as the image was."""
    from sam_backend.segment.engines import EngineError

    points = labels = box = mask_input = None
    if len(prompt.points) > 0:
        points = to_input_frame(np.asarray(prompt.points, dtype=np.float64), original, size)
        labels = np.asarray(prompt.labels, dtype=np.int32)
    if prompt.box is not None:
        box = to_input_frame(np.asarray(prompt.box, dtype=np.float64).reshape(2, 2), original, size).reshape(4)
    low = (4 * grid, 4 * grid)
    if prev_logits is not None:
        logits = np.asarray(prev_logits, dtype=np.float32)
        if logits.shape[-2:] != low:
            raise EngineError(f"prev_logits: expected {low}, got {logits.shape}")
        mask_input = logits.reshape(1, 1, *low)
    elif prompt.stroke is not None:  # the scribble, resized and padded as the image was, as the mask prompt
        import cv2

        frame = np.zeros((side, side), bool)
        frame[:size[0], :size[1]] = cv2.resize(prompt.stroke.astype(np.uint8), (size[1], size[0]),
                                               interpolation=cv2.INTER_NEAREST) > 0
        mask_input = stroke_logits(frame, low)[None, None]
    return points, labels, box, mask_input


def wants_candidates(prompt: object, prev_logits: np.ndarray | None) -> bool:
    """Whether the decoder answers with its 3 candidates (a lone first click: ambiguous) rather than 1."""
    return prev_logits is None and prompt.box is None and prompt.stroke is None and len(prompt.points) == 1


def graph_candidates(multimask: bool) -> slice:
    """Which of the decoder graph's mask tokens answer (`MaskDecoder.forward`'s choice): the three ambiguous
    candidates for a lone first click, else the first."""
    return slice(1, None) if multimask else slice(0, 1)


def prompt_feed(points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None,
                mask_input: np.ndarray | None, grid: int) -> dict[str, np.ndarray]:
    """The decoder graph's prompt inputs (`SamDecoderGraph`; its `image_embeddings` are the embedding's), in the
    order the eager prompt encoder lays its tokens out: the points, then the box corners (labels 2, 3) or, without a
    box, a padding point (label -1)."""
    coords = [points] if points is not None else []
    kinds = [labels.astype(np.float32)] if labels is not None else []
    if box is not None:
        coords.append(box.reshape(2, 2))
        kinds.append(np.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], np.float32))
    else:
        coords.append(np.zeros((1, 2), np.float32))
        kinds.append(np.array([NO_LABEL], np.float32))
    has_mask = mask_input is not None
    return {"point_coords": np.concatenate(coords).astype(np.float32)[None],
            "point_labels": np.concatenate(kinds)[None],
            "mask_input": mask_input if has_mask else np.zeros((1, 1, 4 * grid, 4 * grid), np.float32),
            "has_mask_input": np.array([float(has_mask)], np.float32)}


def answer(logits: np.ndarray, scores: np.ndarray, size: tuple[int, int], original: tuple[int, int], side: int,
           threshold: float = 0.0) -> MaskPrediction:
    """The candidates `logits` `(K, 4g, 4g)` with their `scores` `(K,)` as a `MaskPrediction` whose masks are brought
    to the photo on demand (`upsample_mask`): only the mask the answer needs goes to full resolution."""
    logits = np.asarray(logits, np.float32)

    def upsample(i: int) -> np.ndarray:
        return upsample_mask(logits[i], size, original, side, threshold)

    return MaskPrediction(None, np.asarray(scores, np.float32), logits, upsample)


def upsample_mask(low_res: np.ndarray, size: tuple[int, int], original: tuple[int, int], side: int,
                  threshold: float = 0.0) -> np.ndarray:
    """`(4g, 4g)` logits → `(H, W) bool` in the photo: bilinear to the `side` square, cropped to the resized photo
    `size`, bilinear to `original` (half-pixel centres, as `Sam.postprocess_masks`), `> threshold`."""
    import cv2

    square = cv2.resize(np.asarray(low_res, np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    crop = square[:size[0], :size[1]]
    return cv2.resize(crop, (original[1], original[0]), interpolation=cv2.INTER_LINEAR) > threshold
