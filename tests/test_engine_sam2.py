"""SAM 2.1 engine on a tiny SAM 2 built from the `sam2` package's own modules: shapes, multimask choice,
logits fed back, box + points, bytes of the embedding, and equality with `SAM2ImagePredictor`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import disc_scene, rect_scene

from sam_backend.config import ConfigError, Settings
from sam_backend.segment.engines import EngineError
from sam_backend.segment.engines.factory import make_engine
from sam_backend.segment.engines.sam2 import Sam2Engine, build_model
from sam_backend.segment.geometry import ImageSize
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.serving.cache import EmbeddingCache


def prompt(points=(), labels=(), box=None, size=(320, 240)):
    return ObjectPrompt(np.array(points, np.float32).reshape(-1, 2), np.array(labels, np.int32),
                        None if box is None else np.array(box, np.float32), "Object", "tag", "image", size)


def test_embedding_holds_the_three_feature_maps(tiny_sam2_engine):
    image, _, _ = disc_scene()
    emb = tiny_sam2_engine.embed(image)
    assert emb.image_size == ImageSize(width=320, height=240)
    shapes = {k: tuple(v.shape) for k, v in emb.features.items()}
    assert shapes == {"image_embed": (1, 256, 16, 16), "high_res_0": (1, 32, 64, 64), "high_res_1": (1, 64, 32, 32)}
    assert all(v.dtype == torch.float32 for v in emb.features.values())
    assert emb.nbytes == 4 * (256 * 16 * 16 + 32 * 64 * 64 + 64 * 32 * 32)


def test_the_cache_accounts_the_real_bytes(tiny_sam2_engine):
    image, _, _ = disc_scene()
    emb = tiny_sam2_engine.embed(image)
    cache: EmbeddingCache = EmbeddingCache(int(2.5 * emb.nbytes))
    for i in range(3):
        cache.get_or_compute(("sam2", i), lambda: tiny_sam2_engine.embed(image))
    s = cache.stats()
    assert s.bytes == 2 * emb.nbytes and s.entries == 2 and s.evictions == 1


def test_first_click_is_multimask_and_best_is_highest_score(tiny_sam2_engine):
    image, _, (cx, cy, _) = disc_scene()
    pred = tiny_sam2_engine.predict(tiny_sam2_engine.embed(image), prompt([(cx, cy)], [1]))
    assert pred.masks.shape == (3, 240, 320) and pred.low_res_logits.shape == (3, 64, 64)
    assert pred.best == int(np.argmax(pred.scores))


def test_later_clicks_are_single_mask_seeded_with_the_previous_logits(tiny_sam2_engine):
    image, _, (cx, cy, _) = disc_scene()
    emb = tiny_sam2_engine.embed(image)
    first = tiny_sam2_engine.predict(emb, prompt([(cx, cy)], [1]))
    two = prompt([(cx, cy), (cx + 10, cy)], [1, 1])
    seeded = tiny_sam2_engine.predict(emb, two, prev_logits=first.low_res_logits[first.best])
    zero = tiny_sam2_engine.predict(emb, two, prev_logits=np.zeros((64, 64), np.float32))
    assert seeded.masks.shape == (1, 240, 320)
    assert not np.allclose(seeded.low_res_logits, zero.low_res_logits)  # the logits really reach the model
    with pytest.raises(EngineError, match="prev_logits"):
        tiny_sam2_engine.predict(emb, two, prev_logits=np.zeros((256, 256), np.float32))


CASES = {"one click": dict(points=[(160, 120)], labels=[1]),
         "click and negative": dict(points=[(160, 120), (40, 30)], labels=[1, 0]),
         "box": dict(box=(90, 55, 230, 170)),
         "box and click": dict(points=[(150, 110)], labels=[1], box=(90, 55, 230, 170))}


@pytest.mark.parametrize("case", list(CASES))
def test_predict_matches_sam2s_own_image_predictor(tiny_sam2_engine, case):
    """The engine uses the model's public pieces; SAM2ImagePredictor (told this tiny model's feature sizes) is
    the reference it must equal, bit for bit."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image, _, _ = rect_scene()
    spec = CASES[case]
    p = prompt(spec.get("points", ()), spec.get("labels", ()), spec.get("box"))
    ours = tiny_sam2_engine.predict(tiny_sam2_engine.embed(image), p)
    reference = SAM2ImagePredictor(tiny_sam2_engine.model)
    reference._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # the reference hard-codes a 1024 model's sizes
    reference.set_image(image)
    masks, scores, logits = reference.predict(
        point_coords=p.points if len(p.points) else None, point_labels=p.labels if len(p.points) else None,
        box=p.box, multimask_output=len(p.points) == 1 and p.box is None)
    assert np.array_equal(ours.masks, masks.astype(bool))
    assert np.allclose(ours.scores, scores, atol=1e-6) and np.allclose(ours.low_res_logits, logits, atol=1e-5)


def test_embedding_round_trips_through_bytes(tiny_sam2_engine):
    image, _, (cx, cy, _) = disc_scene()
    emb = tiny_sam2_engine.embed(image)
    back = tiny_sam2_engine.load(tiny_sam2_engine.dump(emb))
    assert {k: v.dtype for k, v in back.features.items()} == {k: v.dtype for k, v in emb.features.items()}
    assert all(torch.equal(back.features[k], emb.features[k]) for k in emb.features)
    p = prompt([(cx, cy)], [1])
    assert np.array_equal(tiny_sam2_engine.predict(back, p).masks, tiny_sam2_engine.predict(emb, p).masks)


def test_loaded_through_the_settings_like_production(tiny_sam2_checkpoint, tmp_path):
    settings = Settings.from_env({"SAM_ENGINE": "sam2", "SAM_CHECKPOINT": str(tiny_sam2_checkpoint),
                                  "SAM_DEVICE": "cpu", "SAM_METADATA_DB": str(tmp_path / "s.db")})
    assert settings.model_type == "sam2.1_hiera_tiny"  # the engine's default model
    engine = make_engine(settings)
    assert isinstance(engine, Sam2Engine) and engine.engine_id.startswith("sam2/sam2.1_hiera_tiny/")


def test_model_type_must_fit_the_engine():
    with pytest.raises(ConfigError, match="SAM_MODEL_TYPE: 'vit_b' is not a model of SAM_ENGINE=sam2"):
        Settings.from_env({"SAM_ENGINE": "sam2", "SAM_MODEL_TYPE": "vit_b"})


def test_a_checkpoint_cannot_name_classes_through_its_overrides(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "evil.pt"
    state = build_model("sam2.1_hiera_tiny", ["++model.image_size=256"]).state_dict()
    torch.save({"model": state, "sam_backend": {"model_type": "sam2.1_hiera_tiny",
                                                "overrides": ["++model._target_=os.system"]}}, path)
    with pytest.raises(EngineError, match="not allowed"):
        Sam2Engine.from_checkpoint(path, device="cpu")


def test_a_sam_checkpoint_is_not_a_sam2_one(tiny_checkpoint):
    with pytest.raises(EngineError, match="expected a SAM 2 checkpoint"):
        Sam2Engine.from_checkpoint(tiny_checkpoint, device="cpu")


def test_up_picks_the_recommended_model_for_the_hardware(tiny_sam2_checkpoint, tmp_path):
    """Without SAM_ENGINE / SAM_MODEL_TYPE, `up` takes the README's recommendation: Hiera-T on a CPU, Hiera-L on
    a GPU; a named choice passes through. The checkpoint is already here, so nothing is downloaded."""
    import shutil

    from sam_backend.commands.up import choose_model, recommended_model

    assert recommended_model(has_gpu=False) == ("sam2", "sam2.1_hiera_tiny")
    assert recommended_model(has_gpu=True) == ("sam2", "sam2.1_hiera_large")
    shutil.copy(tiny_sam2_checkpoint, tmp_path / "sam2.1_hiera_tiny.pt")
    env = {"SAM_CHECKPOINT_DIR": str(tmp_path)}
    if not torch.cuda.is_available():
        assert choose_model(Settings.from_env(env), env) == ("sam2", "sam2.1_hiera_tiny")
    named = {**env, "SAM_ENGINE": "grabcut"}
    assert choose_model(Settings.from_env(named), named)[0] == "grabcut"
