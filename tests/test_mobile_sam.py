"""MobileSAM with its real weights on real photographs: the same masks as upstream, the ONNX decoder, the product's
quality above a floor a broken pipeline would miss, and the model Label Studio is told about."""

from __future__ import annotations

import json
import shutil
import warnings

import cv2
import numpy as np
import pytest
from conftest import evalset, real_photo

from sam_backend.config import Settings
from sam_backend.segment.engines import EngineError
from sam_backend.segment.engines.sam import SamEngine
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.simulator import iou

pytestmark = pytest.mark.slow


def photo(name: str = "GrabCut", index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return real_photo(name, index)


def prompts(mask: np.ndarray) -> list[ObjectPrompt]:
    """A table of prompts on one object: its deepest point, two points, a positive and a negative, its box, a box
    with a point."""
    from sam_backend.segment.simulator import first_click

    h, w = mask.shape
    x, y, _ = first_click(mask)
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    outside = (float(min(w - 1, xs.max() + 5)), float(ys.min()))
    mk = ObjectPrompt
    return [mk([[x, y]], [1], None, "o", None, None, (w, h)),
            mk([[x, y], [(x + xs.min()) / 2, y]], [1, 1], None, "o", None, None, (w, h)),
            mk([[x, y], outside], [1, 0], None, "o", None, None, (w, h)),
            mk(np.zeros((0, 2)), np.zeros(0), box, "o", None, None, (w, h)),
            mk([[x, y]], [1], box, "o", None, None, (w, h))]


def test_vit_t_is_read_off_the_checkpoint(mobile_sam_engine, mobile_sam_checkpoint):
    assert mobile_sam_engine.architecture_name == "vit_t"
    assert mobile_sam_engine.engine_id.startswith("sam/vit_t/6dbb90523a35/") or "/vit_t/" in mobile_sam_engine.engine_id
    with pytest.raises(EngineError, match="holds a vit_t model but SAM_MODEL_TYPE=vit_b"):
        SamEngine.from_checkpoint(mobile_sam_checkpoint, model_type="vit_b", device="cpu")


def test_masks_scores_and_logits_equal_upstream_predictor(mobile_sam_engine, mobile_sam_checkpoint):
    """Every prompt of the table, alone and seeded with the previous logits: the engine's eager path gives exactly
    what `mobile_sam.SamPredictor` gives with the same weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import SamPredictor, sam_model_registry

    image, mask = photo()
    upstream = SamPredictor(sam_model_registry["vit_t"](checkpoint=str(mobile_sam_checkpoint)).eval())
    upstream.set_image(image)
    embedding = mobile_sam_engine.embed(image)
    for prompt in prompts(mask):
        ours = mobile_sam_engine.predict_with(None, embedding, prompt)
        multimask = prompt.box is None and len(prompt.points) == 1
        kwargs = {"point_coords": prompt.points if len(prompt.points) else None,
                  "point_labels": prompt.labels if len(prompt.points) else None, "box": prompt.box}
        masks, scores, low = upstream.predict(**kwargs, multimask_output=multimask)
        np.testing.assert_allclose(ours.scores, scores, atol=1e-4)
        np.testing.assert_allclose(ours.low_res_logits, low, atol=1e-3)
        assert all(iou(a, b) > 0.999 for a, b in zip(ours.masks, masks, strict=True))
        seed = low[int(np.argmax(scores))]
        again = mobile_sam_engine.predict_with(None, embedding, prompt, seed)
        masks2, scores2, _ = upstream.predict(**kwargs, mask_input=seed[None], multimask_output=False)
        np.testing.assert_allclose(again.scores, scores2, atol=1e-4)
        assert iou(again.best_mask, masks2[0]) > 0.999
    # and the masks are of the object: a pipeline with swapped axes or a wrong resize would miss it
    box_answer = mobile_sam_engine.predict_with(None, embedding, prompts(mask)[3])
    assert iou(box_answer.best_mask, mask) > 0.85


def test_onnx_decoder_gives_eager_masks_on_real_weights(mobile_sam_checkpoint, tmp_path):
    """With the real weights the ONNX decoder is accepted at start (random features alone put trained logits on
    the threshold; an encoded image decides) and agrees with eager on a real photo's prompts."""
    shutil.copy(mobile_sam_checkpoint, tmp_path / "mobile_sam.pt")
    engine = SamEngine.from_checkpoint(tmp_path / "mobile_sam.pt", device="cpu", precision="fp32")
    assert engine.use_decoder("onnx", engine.decoder_cache(tmp_path / "mobile_sam.pt")) == "onnx"
    image, mask = photo("Berkeley", 3)
    embedding = engine.embed(image)
    for prompt in prompts(mask):
        eager = engine.predict_with(None, embedding, prompt)
        fast = engine.predict(embedding, prompt)
        assert eager.best == fast.best
        assert iou(eager.best_mask, fast.best_mask) >= 0.999
        seeded = engine.predict(embedding, prompt, fast.low_res_logits[fast.best])
        assert iou(engine.predict_with(None, embedding, prompt, eager.low_res_logits[eager.best]).best_mask,
                   seeded.best_mask) >= 0.999


def test_model_version_names_the_loaded_model(mobile_sam_checkpoint, tmp_path):
    """SAM_CHECKPOINT holds MobileSAM while SAM_MODEL_TYPE is left at its default: Label Studio is told vit_t."""
    from sam_backend.serving.app import create_app

    image, mask = photo()
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    settings = Settings.from_env({"SAM_CHECKPOINT": str(mobile_sam_checkpoint), "SAM_DECODER": "eager",
                                  "SAM_ENCODER": "eager", "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
                                  "SAM_METADATA_DB": str(tmp_path / "sidecar.db")})
    client = create_app(settings).test_client()
    h, w = mask.shape
    from sam_backend.commands.evaluate import CONFIG, LABEL
    from sam_backend.labelstudio.context import keypoint_result
    from sam_backend.segment.simulator import first_click

    x, y, _ = first_click(mask)
    body = {"tasks": [{"id": 1, "data": {"image": "photo.png"}}], "label_config": CONFIG,
            "params": {"context": {"result": [keypoint_result(x, y, (w, h), True, LABEL)]}}}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.data
    answer = resp.json
    assert answer["model_version"].endswith("-sam-vit_t")
    assert answer["results"][0]["model_version"] == answer["model_version"]
    assert client.get("/health").json["model_version"].endswith("-sam-vit_t")


@pytest.mark.parametrize("name, floor_miou3, ceiling_noc90", [("GrabCut", 0.88, 3.0), ("Berkeley", 0.85, 4.0)])
def test_product_quality_on_real_photos(mobile_sam_checkpoint, tmp_path, name, floor_miou3, ceiling_noc90):
    """The product's path (Label Studio-shaped bodies → backend → brush RLE → mask) on the first 6 objects of a
    shared set with the standard simulator: mIoU after 3 clicks and NoC@90 within what MobileSAM reaches on them
    (≈0.93 / ≈2 on the whole sets); every click answered, none refused; the plain predictor run beside it."""
    from click.testing import CliRunner

    from sam_backend.commands.cli import main

    env = {"SAM_CHECKPOINT": str(mobile_sam_checkpoint), "SAM_PRECISION": "fp32"}
    out = tmp_path / "out"
    result = CliRunner(env=env).invoke(main, ["evaluate", str(evalset(name)), "--limit", "6", "--plain",
                                              "--max-clicks", "8", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    product = summary["sam/vit_t/fp32/clicks"]
    plain = summary["sam/vit_t/fp32/clicks/plain"]
    assert product["objects"] == plain["objects"] == 6
    assert product["miou"][2] >= floor_miou3, product
    assert product["noc90"] <= ceiling_noc90, product
    assert product["refused"] == 0
    assert (out / "miou_vs_clicks.png").stat().st_size > 0


def test_compact_embeddings_of_the_shared_tiers_give_the_same_masks(mobile_sam_engine):
    """float16 features, as the Redis and directory tiers store them, on real weights and a real photo."""
    image, mask = photo("Berkeley", 1)
    embedding = mobile_sam_engine.embed(image)
    data = mobile_sam_engine.dump(embedding, compact=True)
    assert len(data) < 2.2 * 2**20  # 256 × 64 × 64 half floats, and a header
    again = mobile_sam_engine.load(data)
    for prompt in prompts(mask):
        a = mobile_sam_engine.predict_with(None, embedding, prompt).best_mask
        b = mobile_sam_engine.predict_with(None, again, prompt).best_mask
        assert iou(a, b) >= 0.99


def test_random_mobile_sam_for_timing():
    """`bench --random-weights --model-type vit_t` builds MobileSAM's architecture without weights."""
    engine = SamEngine.random("vit_t", device="cpu", precision="fp32")
    assert engine.engine_id == "sam/vit_t/random0/fp32"
    assert sum(p.numel() for p in engine.model.parameters()) == pytest.approx(10.1e6, rel=0.03)
