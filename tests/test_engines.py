"""Engines: the real SAM code on a tiny checkpoint (shapes, multimask, logits fed back) and GrabCut quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import disc_scene, iou, rect_scene

from sam_backend.segment.engines import EngineError
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.segment.engines.sam import SamArchitecture, SamEngine
from sam_backend.segment.geometry import ImageSize
from sam_backend.segment.prompts import ObjectPrompt


def prompt(points=(), labels=(), box=None, size=(320, 240)):
    pts = np.array(points, np.float32).reshape(-1, 2)
    return ObjectPrompt(pts, np.array(labels, np.int32), None if box is None else np.array(box, np.float32),
                        "Object", "tag", "image", size)


# -- SAM on the tiny checkpoint ----------------------------------------------------------------

def test_architecture_is_read_from_the_checkpoint(tiny_engine):
    arch = SamArchitecture.from_state_dict(tiny_engine.model.state_dict())
    assert (arch.img_size, arch.embed_dim, arch.depth, arch.num_heads, arch.global_attn_indexes,
            arch.window_size, arch.prompt_dim) == (256, 64, 2, 2, (1,), 8, 64)
    assert tiny_engine.engine_id.startswith("sam/custom-64x2@256/")


def test_official_architectures_are_recognised():
    from segment_anything.build_sam import build_sam_vit_b

    arch = SamArchitecture.from_state_dict(build_sam_vit_b().state_dict())
    assert arch.name == "vit_b" and arch.num_heads == 12 and arch.global_attn_indexes == (2, 5, 8, 11)


def test_embed_shapes(tiny_engine):
    image, _, _ = disc_scene()
    emb = tiny_engine.embed(image)
    assert emb.image_size == ImageSize(width=320, height=240)
    features = emb.features["image_embed"]
    assert tuple(features.shape) == (1, 64, 16, 16) and features.dtype == torch.float32
    assert emb.nbytes == 64 * 16 * 16 * 4


def test_first_click_is_multimask_and_best_is_highest_score(tiny_engine):
    image, _, (cx, cy, _) = disc_scene()
    pred = tiny_engine.predict(tiny_engine.embed(image), prompt([(cx, cy)], [1]))
    assert pred.masks.shape == (3, 240, 320) and pred.masks.dtype == bool
    assert pred.low_res_logits.shape == (3, 64, 64)
    assert pred.best == int(np.argmax(pred.scores))


def test_second_click_uses_single_mask_and_previous_logits(tiny_engine):
    image, _, (cx, cy, _) = disc_scene()
    emb = tiny_engine.embed(image)
    first = tiny_engine.predict(emb, prompt([(cx, cy)], [1]))
    two = prompt([(cx, cy), (cx + 10, cy)], [1, 1])
    with_logits = tiny_engine.predict(emb, two, prev_logits=first.low_res_logits[first.best])
    without = tiny_engine.predict(emb, two, prev_logits=np.zeros((64, 64), np.float32))
    assert with_logits.masks.shape == (1, 240, 320)
    # The logits are really fed to the prompt encoder: another mask input changes the output.
    assert not np.allclose(with_logits.low_res_logits, without.low_res_logits)


def test_box_prompt_is_single_mask(tiny_engine):
    image, _, _ = rect_scene()
    pred = tiny_engine.predict(tiny_engine.embed(image), prompt(box=(90, 55, 230, 170)))
    assert pred.masks.shape == (1, 240, 320)


def test_wrong_logits_shape_and_foreign_embedding_are_refused(tiny_engine):
    image, _, (cx, cy, _) = disc_scene()
    emb = tiny_engine.embed(image)
    with pytest.raises(EngineError, match="prev_logits"):
        tiny_engine.predict(emb, prompt([(cx, cy)], [1]), prev_logits=np.zeros((256, 256), np.float32))
    with pytest.raises(EngineError, match="embedding from"):
        tiny_engine.predict(GrabCutEngine().embed(image), prompt([(cx, cy)], [1]))


def test_bf16_engine_gives_a_distinct_cache_identity(tiny_engine):
    other = tiny_engine.with_precision("bf16")
    assert other.engine_id != tiny_engine.engine_id and other.model is tiny_engine.model
    image, _, _ = disc_scene()
    assert other.embed(image).features["image_embed"].dtype == torch.float32


def test_missing_checkpoint_names_the_command(tmp_path):
    with pytest.raises(EngineError, match="sam-backend download vit_b"):
        SamEngine.from_checkpoint(tmp_path / "nope.pth", model_type="vit_b")


def test_wrong_model_type_is_refused(tiny_checkpoint):
    with pytest.raises(EngineError, match="SAM_MODEL_TYPE=vit_l"):
        SamEngine.from_checkpoint(tiny_checkpoint, model_type="vit_l", device="cpu")


def test_pickle_with_a_payload_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path, pickle_module=pickle)
    with pytest.raises(EngineError, match="refused to load"):
        SamEngine.from_checkpoint(path, device="cpu")


def test_not_a_sam_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(EngineError, match="not a SAM checkpoint"):
        SamEngine.from_checkpoint(path, device="cpu")


def test_wrong_digest_is_refused(tiny_checkpoint):
    with pytest.raises(EngineError, match="expected 0000"):
        SamEngine.from_checkpoint(tiny_checkpoint, device="cpu", expected_sha256="0" * 64)


def test_image_must_be_rgb_uint8(tiny_engine):
    with pytest.raises(EngineError, match="uint8 RGB"):
        tiny_engine.embed(np.zeros((10, 10), np.uint8))


# -- GrabCut quality on synthetic scenes -------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grabcut_from_a_box(seed):
    engine = GrabCutEngine()
    image, truth, (cx, cy, r) = disc_scene(seed=seed)
    pred = engine.predict(engine.embed(image), prompt(box=(cx - r - 6, cy - r - 6, cx + r + 6, cy + r + 6)))
    assert iou(pred.masks[0], truth) >= 0.9

    image, truth, (x1, y1, x2, y2) = rect_scene(seed=seed)
    pred = engine.predict(engine.embed(image), prompt(box=(x1 - 6, y1 - 6, x2 + 6, y2 + 6)))
    assert iou(pred.masks[0], truth) >= 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grabcut_from_one_click(seed):
    engine = GrabCutEngine()
    image, truth, (cx, cy, r) = disc_scene(seed=seed)
    pred = engine.predict(engine.embed(image), prompt([(cx + r / 3, cy)], [1]))
    assert iou(pred.masks[0], truth) >= 0.7

    image, truth, (x1, y1, x2, y2) = rect_scene(seed=seed)
    pred = engine.predict(engine.embed(image), prompt([((x1 + x2) / 2, (y1 + y2) / 2)], [1]))
    assert iou(pred.masks[0], truth) >= 0.7


def test_grabcut_negative_click_removes_a_region():
    engine = GrabCutEngine()
    image, truth, (x1, y1, x2, y2) = rect_scene()
    emb = engine.embed(image)
    box = (x1 - 6, y1 - 6, x2 + 6, y2 + 6)
    plain = engine.predict(emb, prompt(box=box)).masks[0]
    neg_at = (x1 + 8, y1 + 8)
    with_neg = engine.predict(emb, prompt([neg_at], [0], box=box)).masks[0]
    assert plain[neg_at[1], neg_at[0]] and not with_neg[neg_at[1], neg_at[0]]


def test_grabcut_downscales_large_images_and_returns_full_size():
    engine = GrabCutEngine(max_side=160)
    image, truth, (cx, cy, r) = disc_scene(h=480, w=640)
    emb = engine.embed(image)
    assert emb.features["image"].shape[:2] == (120, 160)
    pred = engine.predict(emb, prompt(box=(cx - r - 8, cy - r - 8, cx + r + 8, cy + r + 8), size=(640, 480)))
    assert pred.masks.shape == (1, 480, 640) and iou(pred.masks[0], truth) >= 0.85


# -- the engine against segment-anything's own predictor, and embeddings as bytes ---------------

PREDICTOR_CASES = {
    "one click": dict(points=[(160, 120)], labels=[1]),
    "click and negative": dict(points=[(160, 120), (40, 30)], labels=[1, 0]),
    "box": dict(box=(90, 55, 230, 170)),
    "box and click": dict(points=[(150, 110)], labels=[1], box=(90, 55, 230, 170)),
}


@pytest.mark.parametrize("case", list(PREDICTOR_CASES))
def test_predict_matches_segment_anythings_predictor(tiny_engine, case):
    """The engine uses segment-anything's public pieces; SamPredictor is the reference it must equal."""
    from segment_anything import SamPredictor

    image, _, _ = disc_scene()
    spec = PREDICTOR_CASES[case]
    p = prompt(spec.get("points", ()), spec.get("labels", ()), spec.get("box"))
    ours = tiny_engine.predict(tiny_engine.embed(image), p)
    reference = SamPredictor(tiny_engine.model)
    reference.set_image(image)
    masks, scores, logits = reference.predict(
        point_coords=p.points if len(p.points) else None, point_labels=p.labels if len(p.points) else None,
        box=p.box, multimask_output=len(p.points) == 1 and p.box is None)
    assert ours.masks.shape == masks.shape and np.array_equal(ours.masks, masks)
    assert np.allclose(ours.scores, scores, atol=1e-6) and np.allclose(ours.low_res_logits, logits, atol=1e-5)


@pytest.mark.parametrize("engine_name", ["sam", "grabcut"])
def test_embedding_round_trips_through_bytes(tiny_engine, engine_name):
    engine = tiny_engine if engine_name == "sam" else GrabCutEngine()
    image, _, (cx, cy, _) = disc_scene()
    emb = engine.embed(image)
    data = engine.dump(emb)
    back = engine.load(data)
    assert back.engine_id == emb.engine_id and back.image_size == emb.image_size and back.meta == emb.meta
    for name, array in emb.features.items():
        original = array.cpu().numpy() if isinstance(array, torch.Tensor) else array
        restored = back.features[name].cpu().numpy() if isinstance(back.features[name], torch.Tensor) else \
            back.features[name]
        assert restored.dtype == original.dtype and np.array_equal(restored, original)
    p = prompt([(cx, cy)], [1])
    assert np.array_equal(engine.predict(back, p).masks, engine.predict(emb, p).masks)


def test_torn_or_foreign_embedding_bytes_are_refused(tiny_engine):
    from sam_backend.segment.embedding import EmbeddingFormatError

    image, _, _ = disc_scene()
    data = tiny_engine.dump(tiny_engine.embed(image))
    with pytest.raises(EmbeddingFormatError, match="torn"):
        tiny_engine.load(data[:-100])
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    with pytest.raises(EmbeddingFormatError, match="crc32"):
        tiny_engine.load(bytes(flipped))
    with pytest.raises(EmbeddingFormatError, match="not an embedding"):
        tiny_engine.load(b"\x80\x04\x95pickle" + data[16:])
    with pytest.raises(EngineError, match="embedding from"):
        tiny_engine.with_precision("bf16").load(data)
