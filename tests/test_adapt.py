"""Learning from accepted masks (`SAM_ADAPT`): the webhook intake, the training and its held-out judgement, versions
on disk and in the shared store, and `evaluate --adapt-on`. Real MobileSAM weights and real photographs (GrabCut),
the backend's own HTTP app; nothing is mocked."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import evalset, load_request, real_photo
from ls_standin import LabelStudioStandIn

from sam_backend.commands.evaluate import CONFIG, LABEL
from sam_backend.config import Settings
from sam_backend.labelstudio.accepted import MaskRecord, annotation_masks, read_notice
from sam_backend.labelstudio.brush import encode_brush
from sam_backend.labelstudio.context import keypoint_result
from sam_backend.segment import adapt as A
from sam_backend.segment.simulator import first_click

# GrabCut's second photo: MobileSAM's first click there takes a part (IoU 0.06); the whole object is one click away.
PHOTO = 1


# -- pieces ---------------------------------------------------------------------------------------------------------

def test_every_fifth_accepted_mask_is_held_out_and_stays_held_out():
    train, held = A.split_held_out(list(range(12)))
    assert held == [4, 9] and train == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    more_train, more_held = A.split_held_out(list(range(15)))
    assert set(held) <= set(more_held) and not set(more_held) & set(more_train)


@pytest.mark.parametrize("objects, new, old, kept", [
    (1, (2.0, 0, 0.80), (3.0, 0, 0.80), True),  # fewer clicks
    (1, (2.0, 1, 0.90), (3.0, 8, 0.80), True),  # fewer failed runs
    (1, (2.0, 1, 0.90), (3.0, 0, 0.80), False),  # fewer clicks but a failed run more: refused
    (1, (3.0, 0, 0.80), (3.0, 0, 0.80), True),  # as good: one object cannot tell them apart, the version is kept
    (1, (4.9, 0, 0.95), (3.0, 0, 0.80), True),  # within the margin of one held-out object (2 clicks)
    (1, (5.1, 0, 0.95), (3.0, 0, 0.80), False),  # beyond it
    (4, (4.1, 0, 0.95), (3.0, 0, 0.80), False),  # four objects: the margin is 1 click
    (4, (3.9, 0, 0.95), (3.0, 0, 0.80), True),
])
def test_a_version_is_kept_unless_its_held_out_runs_say_it_is_worse(objects, new, old, kept):
    assert A.Scores(objects, *new).kept_over(A.Scores(objects, *old)) is kept


def test_version_bytes_round_trip_and_foreign_bytes_are_refused(tmp_path):
    state = {"iou_token.weight": torch.randn(1, 256)}
    back, meta = A.unpack_version(A.pack_version(state, {"weights": "sam/vit_t/x", "version": 3}))
    assert torch.equal(back["iou_token.weight"], state["iou_token.weight"]) and meta["version"] == 3
    for data in (b"not a version", json.dumps({"format": 1}).encode()):
        with pytest.raises(A.AdaptError):
            A.unpack_version(data)

    class Boom:  # a pickle that would run code: torch.load(weights_only=True) refuses it
        def __reduce__(self):
            return (print, ("ran",))

    import io

    buf = io.BytesIO()
    torch.save({"format": 1, "state": {}, "meta": Boom()}, buf)
    with pytest.raises(A.AdaptError):
        A.unpack_version(buf.getvalue())


def test_the_webhook_fixture_names_its_annotation_and_its_regions_are_read_one_by_one():
    """A webhook is read only for the ids it names; the regions that are learnt from are read from the annotation as
    Label Studio holds it (here: the captured one), each bounded before it is decoded."""
    body = load_request("webhook.ANNOTATION_CREATED")
    notice = read_notice(body)
    assert notice.annotations == [1] and not notice.skipped
    found = list(annotation_masks(body["annotation"], body["task"], "1"))
    [mask] = found  # the rectangle of the same annotation is not a mask
    assert isinstance(mask, MaskRecord) and mask.mask().shape == (480, 640) and mask.mask().any()
    assert mask.label == "Object" and mask.image_url == body["task"]["data"]["image"] and mask.project == "1"

    empty = json.loads(json.dumps(body))
    empty["annotation"]["result"][0]["value"]["rle"] = encode_brush(np.zeros((480, 640), bool))
    assert [s.reason for s in annotation_masks(empty["annotation"], body["task"], "1")] == ["empty"]
    torn = json.loads(json.dumps(body))
    torn["annotation"]["result"][0]["original_width"] = 641  # the RLE does not fit the size it claims
    assert [s.reason for s in annotation_masks(torn["annotation"], body["task"], "1")] == ["bad_region"]
    huge = json.loads(json.dumps(body))
    huge["annotation"]["result"][0].update(original_width=20000, original_height=20000)
    [skip] = annotation_masks(huge["annotation"], body["task"], "1", max_pixels=50_000_000)
    assert skip.reason == "bad_region" and "SAM_MAX_IMAGE_PIXELS" in skip.message
    assert read_notice({"action": "ANNOTATION_CREATED", "annotation": {"id": "../x"}}).skipped[0].reason == \
        "bad_annotation"
    assert read_notice({"action": "PROJECT_UPDATED", "project": {"id": 1}}).annotations == []
    deleted = read_notice({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 3}, {"id": "x"}]})
    assert deleted.annotations == [3] and deleted.skipped[0].reason == "bad_annotation"


def test_fine_tuning_changes_only_the_decoder_heads_and_learns_the_object(mobile_sam_engine):
    """Trained on one object whose first click takes a part, the adapted decoder takes the whole object at the first
    click; the released decoder is untouched and only `TRAINABLE` tensors differ from it."""
    image, mask = real_photo("GrabCut", PHOTO)
    example = A.Example(mobile_sam_engine.embed(image), mask)
    before = {k: v.clone() for k, v in mobile_sam_engine.model.mask_decoder.state_dict().items()}
    base_runs, _ = A.simulate(mobile_sam_engine, example, "clicks", 3)
    state = A.fine_tune(mobile_sam_engine, [example] * 3, A.AdaptConfig(steps=40))
    assert state and all(k.startswith(A.TRAINABLE) for k in state)
    adapted = mobile_sam_engine.with_mask_decoder(A.adapted_decoder(mobile_sam_engine, state), "t")
    runs, _ = A.simulate(adapted, example, "clicks", 3)
    assert base_runs[0] < 0.5 < 0.9 < runs[0], (base_runs, runs)
    assert all(torch.equal(before[k], v) for k, v in mobile_sam_engine.model.mask_decoder.state_dict().items())
    assert adapted.engine_id == mobile_sam_engine.engine_id  # embeddings are shared with the base
    changed = {k for k, v in adapted.model.mask_decoder.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(A.TRAINABLE) for k in changed)


def test_a_version_of_an_earlier_release_with_more_learnt_parts_never_touches_the_released_decoder(
        mobile_sam_engine):
    """Versions stored by an earlier release also hold the tokens and the upscaling (they learnt then); loading one
    copies those parts for the version instead of sharing them with the released decoder, whose weights stay equal."""
    released = mobile_sam_engine.base_mask_decoder
    before = {k: v.clone() for k, v in released.state_dict().items()}
    old_parts = tuple(p for p in A.EARLIER_PARTS if p not in A.TRAINABLE)
    state = {n: p.detach() + 0.01 for n, p in released.named_parameters() if n.startswith(A.EARLIER_PARTS)}
    assert any(n.startswith(old_parts) for n in state) and not any(n.startswith(old_parts) for n in
                                                                     A.TRAINABLE)
    decoder = A.adapted_decoder(mobile_sam_engine, state)
    assert all(torch.equal(before[k], v) for k, v in released.state_dict().items())
    assert torch.equal(decoder.output_upscaling[0].weight, state["output_upscaling.0.weight"])
    assert decoder.transformer is released.transformer  # what no version changes is still shared


def test_an_adapted_mask_that_misses_the_clicks_falls_back_to_the_released_decoder(mobile_sam_engine):
    """A learnt decoder that stops following the clicks (here: its hypernetworks zeroed, so it answers an empty mask)
    never leaves the annotator worse off: the click gets the released decoder's mask; without the fallback the
    broken mask would be the answer."""
    image, mask = real_photo("GrabCut", 0)
    embedding = mobile_sam_engine.embed(image)
    x, y, _ = first_click(mask)
    size = embedding.image_size
    prompt = A._prompt([(x, y, True)], None, size)
    broken = A.adapted_decoder(mobile_sam_engine)
    with torch.no_grad():
        for p in broken.output_hypernetworks_mlps.parameters():
            p.zero_()
    candidates = mobile_sam_engine.predict(embedding, prompt)
    released = candidates.best_mask
    raw = mobile_sam_engine.with_mask_decoder(broken, "broken", fallback=False).predict(embedding, prompt)
    assert not raw.best_mask.any() and prompt.clicks_missed(raw.best_mask) == 1
    guarded = mobile_sam_engine.with_mask_decoder(broken, "broken").predict(embedding, prompt)
    assert np.array_equal(guarded.best_mask, released) and prompt.clicks_missed(guarded.best_mask) == 0
    # where the adapted mask follows every click it is the answer, not the released one: a decoder whose score head
    # prefers another of the three candidates (each holds the click) answers that candidate
    other = next(i for i in range(3) if i != candidates.best and not np.array_equal(candidates.mask(i), released)
                 and prompt.clicks_missed(candidates.mask(i)) == 0)
    prefers = A.adapted_decoder(mobile_sam_engine)
    with torch.no_grad():
        last = prefers.iou_prediction_head.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.nn.functional.one_hot(torch.tensor(other + 1), len(last.bias)).float())
    answer = mobile_sam_engine.with_mask_decoder(prefers, "prefers").predict(embedding, prompt).best_mask
    assert np.array_equal(answer, candidates.mask(other)) and not np.array_equal(answer, released)
    negative = A._prompt([(x, y, True), (0.5, 0.5, False)], None, size)
    assert negative.clicks_missed(np.ones(mask.shape, bool)) == 1 and negative.clicks_missed(mask) == 0


# -- the backend --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _stop_learning(monkeypatch):
    """Every app a test builds has its learning thread stopped at the end (no training outlives its test)."""
    from sam_backend.serving import adapters

    started: list = []
    original = adapters.Adapters.start

    def start(self) -> None:
        started.append(self)
        original(self)

    monkeypatch.setattr(adapters.Adapters, "start", start)
    yield
    for a in started:
        a.stop()


@pytest.fixture()
def ls():
    """Label Studio's annotation API, stood in by a loopback server (see `ls_standin`)."""
    standin = LabelStudioStandIn()
    yield standin
    standin.stop()


def _click(client, project: int, image: str, mask: np.ndarray) -> dict:
    h, w = mask.shape
    x, y, _ = first_click(mask)
    body = {"tasks": [{"id": 99, "data": {"image": image}}], "label_config": CONFIG, "project": f"{project}.1",
            "params": {"context": {"result": [keypoint_result(x, y, (w, h), True, LABEL)]}}}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.data
    return resp.json


def _settings(checkpoint: Path, root: Path, ls: LabelStudioStandIn, db: Path, **extra: str) -> Settings:
    env = {"SAM_CHECKPOINT": str(checkpoint), "SAM_DECODER": "onnx", "SAM_ENCODER": "eager", "SAM_PRECISION": "fp32",
           "LOCAL_FILES_DOCUMENT_ROOT": str(root), "SAM_METADATA_DB": str(db), "SAM_ADAPT": "true",
           "SAM_ADAPTER_DIR": str(db.parent / "locks"), "SAM_ADAPT_STEPS": "40", **ls.env(), **extra}
    return Settings.from_env(env)


def _wait(client, project: int, until, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get("/health").json["adapt"]["projects"].get(str(project), {})
        if until(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"project {project} did not get there in {timeout_s} s: {status}")


def _settle(client) -> dict:
    """Drive learning to completion (a call, not a wait against a clock) and return /health's adapt."""
    assert client.application.extensions["sam_backend"].adapters.settle(600)
    return client.get("/health").json["adapt"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("photos")
    image, mask = real_photo("GrabCut", PHOTO)
    cv2.imwrite(str(root / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root, mask


def test_accepted_masks_make_a_version_that_clicks_use_and_that_survives_a_restart(mobile_sam_checkpoint, photos,
                                                                                   tmp_path, ls):
    """Five annotations Label Studio holds (a mask of an object whose first click takes a part) → a version trained
    on four, judged on the fifth, kept (it does better there) → the project's next click answers with it (whole
    object, model_version names it), /health and /metrics show it, another project stays on the base model; clicks
    during the training are all answered, and the training waits for them; a restart serves the same version."""
    from sam_backend.segment.simulator import iou
    from sam_backend.serving.app import create_app

    root, mask = photos
    settings = _settings(mobile_sam_checkpoint, root, ls, tmp_path / "sidecar.db", SAM_ADAPT_STEPS="80")
    app = create_app(settings)
    client = app.test_client()
    base = _click(client, 7, "photo.png", mask)
    base_version = base["model_version"]
    from sam_backend.labelstudio.brush import decode_brush

    def answer_mask(answer: dict) -> np.ndarray:
        region = answer["results"][0]["result"][0]
        return decode_brush(region["value"]["rle"], region["original_width"], region["original_height"])

    assert iou(answer_mask(base), mask) < 0.5
    for n in range(1, 6):
        resp = client.post("/webhook", json=ls.annotate(7, n, "photo.png", mask))
        assert resp.status_code == 200 and resp.json["status"] == "ok", resp.json
        assert resp.json["learning"] == "kept" and resp.json["kept"] == 1 and resp.json["projects"] == ["7"]
    assert "/api/annotations/5/" in ls.asked and "/api/tasks/5/" in ls.asked  # confirmed with Label Studio
    _wait(client, 7, lambda s: s.get("state") == "training")
    answered = [client.post("/predict", json={
        "tasks": [{"id": 99, "data": {"image": "photo.png"}}], "label_config": CONFIG, "project": "8",
        "params": {"context": {"result": [keypoint_result(*first_click(mask)[:2], mask.shape[::-1], True, LABEL)]}}
    }).status_code for _ in range(6)]
    assert answered == [200] * 6  # every click during the training answered
    health = _settle(client)
    status = health["projects"]["7"]
    assert status["version"] == 1 and status["accepted_masks"] == 5
    assert status["learnt_from"] == 4 and status["held_out"]["objects"] == 1
    held = status["held_out"]
    assert (held["adapted"]["noc90"], -held["adapted"]["miou5"]) < (held["base"]["noc90"], -held["base"]["miou5"])
    assert health["paused_steps"] > 0  # the training waited for the clicks above
    adapted = _click(client, 7, "photo.png", mask)
    assert adapted["model_version"] == f"{base_version}-adapted-p7-v1"
    assert adapted["results"][0]["model_version"] == adapted["model_version"]
    assert iou(answer_mask(adapted), mask) > 0.9
    assert _click(client, 8, "photo.png", mask)["model_version"] == base_version  # another project: base
    metrics = client.get("/metrics").data.decode()
    assert 'sam_adapter_version{project="7"} 1.0' in metrics
    assert 'sam_adapter_learnt_masks{project="7"} 4.0' in metrics
    assert 'sam_adapt_trainings_total{result="accepted"} 1.0' in metrics
    assert 'sam_adapter_clicks_total{answer="adapted",project="7"} 1.0' in metrics  # its own decoder answered
    assert client.get("/health").json["adapt"]["projects"]["7"]["clicks"] == {"adapted": 1, "released": 0}
    assert client.get("/versions").json["versions"] == [base_version, f"{base_version}-adapted-p7-v1"]
    app.extensions["sam_backend"].adapters.stop()

    again = create_app(settings).test_client()
    answer = _click(again, 7, "photo.png", mask)
    assert answer["model_version"] == f"{base_version}-adapted-p7-v1"
    assert iou(answer_mask(answer), mask) > 0.9
    assert again.get("/health").json["adapt"]["projects"]["7"]["version"] == 1


def test_a_refused_version_is_not_taken(mobile_sam_checkpoint, photos, tmp_path, ls, monkeypatch):
    """Four accepted masks that are a small disc around the object's deepest point (a team labelling a part) and a
    fifth that is the whole object, judged by a judge no version can satisfy (a margin of -100 clicks, so that the
    refusal does not hang on how close the disc version comes; the rule itself is tested above): the version is
    refused, no version stored, clicks keep the base model, the refusal is counted."""
    from sam_backend.serving.app import create_app

    monkeypatch.setattr(A, "JUDGE_MARGIN_CLICKS", -100.0)

    root, mask = photos
    client = create_app(_settings(mobile_sam_checkpoint, root, ls, tmp_path / "sidecar.db")).test_client()
    base_version = _click(client, 3, "photo.png", mask)["model_version"]
    x, y, _ = first_click(mask)
    disc = cv2.circle(np.zeros(mask.shape, np.uint8), (int(x), int(y)), 6, 1, -1) > 0
    for n in range(1, 5):
        client.post("/webhook", json=ls.annotate(3, n, "photo.png", disc))
    client.post("/webhook", json=ls.annotate(3, 5, "photo.png", mask))
    status = _settle(client)["projects"]["3"]
    assert status["version"] is None and status["newest_version"] is None
    assert status["last_attempt"]["accepted"] is False
    assert client.get("/versions").json["versions"] == [base_version]
    assert _click(client, 3, "photo.png", mask)["model_version"] == base_version
    assert 'sam_adapt_trainings_total{result="refused"} 1.0' in client.get("/metrics").data.decode()


def test_forged_and_bad_webhooks_are_not_learnt_from(mobile_sam_checkpoint, photos, tmp_path, ls, caplog):
    """Only what Label Studio holds is learnt: a body naming an annotation it does not hold, a body whose regions are
    not the ones it holds, a body while it is down, a project id like `../x`: none of their claims are kept. Bad
    regions (another size, empty, cancelled) are skipped with their reason in /health and /metrics; a cancelled
    update and a deletion remove what the annotation gave before; nothing raises."""
    from sam_backend.serving.app import create_app
    from sam_backend.sidecar.learning import LearningStore
    from sam_backend.sidecar.store import Store

    root, mask = photos
    db = tmp_path / "sidecar.db"
    client = create_app(_settings(mobile_sam_checkpoint, root, ls, db)).test_client()
    store = LearningStore(Store(db), tmp_path / "locks")
    small = cv2.resize(mask.astype(np.uint8), (100, 80)) > 0
    x, y, _ = first_click(mask)
    disc = cv2.circle(np.zeros(mask.shape, np.uint8), (int(x), int(y)), 6, 1, -1) > 0

    forged = ls.annotate(4, 1, "photo.png", mask)
    del ls.annotations[1]  # a body for an annotation Label Studio does not hold
    claims_more = ls.annotate(4, 2, "photo.png", mask)  # the body says: the whole object ...
    ls.annotate(4, 2, "photo.png", disc)  # ... Label Studio holds a disc
    path_like = {**ls.annotate(4, 3, "photo.png", small), "project": {"id": "../x"}}
    bodies = [forged, claims_more, path_like,
              ls.annotate(4, 4, "photo.png", np.zeros_like(mask)),
              ls.annotate(4, 5, "photo.png", mask, cancelled=True),
              {"action": "ANNOTATION_UPDATED", "project": {"id": 4}, "annotation": "not an annotation"},
              {"action": "ANNOTATION_CREATED", "project": {"id": 4}, "annotation": {"id": "../../etc", "result": []}}]
    for body in bodies:
        resp = client.post("/webhook", json=body)
        assert resp.status_code == 200, resp.data
    ls.down = True
    assert client.post("/webhook", json=ls.annotate(4, 6, "photo.png", mask)).json["learning"] == "skipped"
    ls.down = False
    assert client.post("/webhook", json=ls.annotate(4, 6, "photo.png", mask)).json["kept"] == 1
    kept = {r.annotation_id: r for r in store.masks("4")}
    assert sorted(kept) == [2, 3, 6]
    assert np.array_equal(kept[2].mask(), disc)  # what Label Studio holds, not what the body claimed
    assert kept[3].project == "4" and store.projects() == ["4"]  # Label Studio's project; no path from `../x`
    assert not (tmp_path / "x").exists() and not (db.parent / "locks" / "..").resolve().joinpath("x").exists()
    client.post("/webhook", json=ls.annotate(4, 6, "photo.png", mask, cancelled=True, action="ANNOTATION_UPDATED"))
    client.post("/webhook", json=ls.delete(2))
    health = client.get("/health").json["adapt"]
    assert health["skipped"] == {"unverified": 2, "empty": 1, "cancelled": 2, "bad_annotation": 2}
    assert health["projects"]["4"]["accepted_masks"] == 1  # the small one; 2 deleted, 6 cancelled
    for n in range(7, 11):  # five kept masks: a training starts; the small one is skipped there
        client.post("/webhook", json=ls.annotate(4, n, "photo.png", mask))
    status = _settle(client)["projects"]["4"]
    assert status["last_attempt"]["trained_on"] == 3 and status["last_attempt"]["held_out_objects"] == 1
    metrics = client.get("/metrics").data.decode()
    assert 'sam_adapt_skipped_total{reason="size_mismatch"} 1.0' in metrics
    assert 'sam_adapt_skipped_total{reason="unverified"} 2.0' in metrics
    assert "(80, 100)" in caplog.text and "Traceback" not in caplog.text


def test_a_webhook_secret_is_required_where_it_is_set(mobile_sam_checkpoint, photos, tmp_path, ls):
    """With SAM_WEBHOOK_SECRET, a webhook without the header (or with another value) is refused (401, counted
    unverified, Label Studio not even asked); with it, the annotation is learnt from."""
    from sam_backend.serving.app import create_app

    root, mask = photos
    client = create_app(_settings(mobile_sam_checkpoint, root, ls, tmp_path / "sidecar.db",
                                  SAM_WEBHOOK_SECRET="s3cret-hook")).test_client()
    body = ls.annotate(5, 1, "photo.png", mask)
    for headers in ({}, {"X-SAM-Webhook-Secret": "guess"}):
        resp = client.post("/webhook", json=body, headers=headers)
        assert resp.status_code == 401 and "X-SAM-Webhook-Secret" in resp.json["errors"][0]
        assert "s3cret" not in resp.get_data(as_text=True)
    assert ls.asked == []
    resp = client.post("/webhook", json=body, headers={"X-SAM-Webhook-Secret": "s3cret-hook"})
    assert resp.status_code == 200 and resp.json["kept"] == 1
    assert client.get("/health").json["adapt"]["skipped"] == {"unverified": 2}


def test_learning_without_a_way_to_verify_refuses_to_start(tmp_path):
    """SAM_ADAPT=true without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the app is not built and `serve` exits
    saying what to set."""
    from click.testing import CliRunner

    from sam_backend.commands.cli import main
    from sam_backend.config import ConfigError
    from sam_backend.serving.app import create_app

    env = {"SAM_ENGINE": "grabcut", "SAM_ADAPT": "true", "SAM_METADATA_DB": str(tmp_path / "s.db")}
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        create_app(Settings.from_env(env), start=False)
    result = CliRunner(env=env).invoke(main, ["serve", "--port", "1"])
    assert result.exit_code != 0 and "LABEL_STUDIO_API_KEY" in result.output
    ok = Settings.from_env({**env, "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k" * 40})
    assert ok.learning_problem() is None


def test_with_adapt_off_a_webhook_changes_nothing(mobile_sam_checkpoint, photos, tmp_path, ls):
    from sam_backend.serving.app import create_app

    root, mask = photos
    client = create_app(_settings(mobile_sam_checkpoint, root, ls, tmp_path / "sidecar.db",
                                  SAM_ADAPT="false")).test_client()
    resp = client.post("/webhook", json=ls.annotate(2, 1, "photo.png", mask))
    assert resp.status_code == 200 and resp.json["learning"].startswith("off")
    assert ls.asked == [] and not (tmp_path / "locks").exists()
    assert client.get("/health").json["adapt"] == {"enabled": False}
    assert "-adapted-" not in _click(client, 2, "photo.png", mask)["model_version"]


def test_replicas_share_accepted_masks_and_versions_through_the_database(mobile_sam_checkpoint, photos, tmp_path, ls):
    """Two replicas on one sidecar database: webhooks alternate between them and every mask is kept; the replica
    that trains publishes version 1, and the other serves the same version at its next clicks."""
    from sam_backend.serving.app import create_app

    root, mask = photos
    db = tmp_path / "sidecar.db"
    one = create_app(_settings(mobile_sam_checkpoint, root, ls, db, SAM_ADAPT_STEPS="80")).test_client()
    two = create_app(_settings(mobile_sam_checkpoint, root, ls, db, SAM_ADAPT_STEPS="80")).test_client()
    for n in range(1, 6):
        (one if n % 2 else two).post("/webhook", json=ls.annotate(9, n, "photo.png", mask))
    assert one.get("/health").json["adapt"]["projects"]["9"]["accepted_masks"] == 5
    _settle(one), _settle(two)
    deadline = time.monotonic() + 60
    while not all("-adapted-p9-v1" in _click(c, 9, "photo.png", mask)["model_version"] for c in (one, two)):
        assert time.monotonic() < deadline, two.get("/health").json["adapt"]
        time.sleep(0.5)
    assert one.get("/health").json["adapt"]["projects"]["9"]["newest_version"] == 1


# -- evaluate --adapt-on ----------------------------------------------------------------------------------------------

def _categories_coco(tmp_path: Path, per_category: int) -> tuple[Path, Path]:
    """A COCO file of two categories (`a`, `b`) of `per_category` GrabCut objects each, and its images' folder."""
    from sam_backend.commands.evalsets import load_objects
    from sam_backend.segment.masks import mask_to_coco

    folder = evalset("GrabCut")
    objects = load_objects(folder, limit=2 * per_category)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    for i, obj in enumerate(objects):
        h, w = obj.mask.shape
        coco["images"].append({"id": i + 1, "file_name": obj.image, "width": w, "height": h})
        coco["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i // per_category,
                                    "segmentation": mask_to_coco(obj.mask)["segmentation"]})
    data = tmp_path / "coco.json"
    data.write_text(json.dumps(coco))
    return data, folder / "data_GT"


def test_evaluate_adapt_on_measures_the_rest_base_and_adapted(mobile_sam_checkpoint, tmp_path):
    """`evaluate --adapt-on 2` on a COCO file of two categories (GrabCut photos, three objects each): each category
    learns from its first two, the third is measured twice; summary.json has both configurations, the adapted one
    ending in /adapted, with what learning cost."""
    from click.testing import CliRunner

    from sam_backend.commands.cli import main

    data, images = _categories_coco(tmp_path, 3)
    out = tmp_path / "out"
    env = {"SAM_CHECKPOINT": str(mobile_sam_checkpoint), "SAM_PRECISION": "fp32", "SAM_ENCODER": "eager",
           "SAM_ADAPT_STEPS": "10"}
    result = CliRunner(env=env).invoke(main, ["evaluate", str(data), "--images", str(images),
                                              "--adapt-on", "2", "--max-clicks", "5", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"sam/vit_t/fp32/clicks", "sam/vit_t/fp32/clicks/adapted"}
    base, adapted = summary["sam/vit_t/fp32/clicks"], summary["sam/vit_t/fp32/clicks/adapted"]
    assert base["objects"] == adapted["objects"] == 2
    learning = adapted["adaptation"]
    assert learning["groups"] == 2 and learning["kept"] + learning["refused"] == 2
    assert learning["seconds_per_accepted_mask"] > 0 and learning["peak_rss_mb"] > 0
    assert set(learning["per_group"]) == {"a", "b"}
    assert all(g["trained_on"] == 2 and g["held_out"] == 0 for g in learning["per_group"].values())
    # nothing held out with two objects, so both versions are kept; every click of the two measured objects is
    # answered by one of them and counted by the decoder that answered it
    assert learning["kept"] == 2 and sum(learning["clicks"].values()) >= 2
    rows = (out / "per_object.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    result = CliRunner(env=env).invoke(main, ["evaluate", str(data), "--images", str(images),
                                              "--adapt-on", "3", "-o", str(out), "--quiet"])
    assert result.exit_code != 0 and "no category has more than 3 objects" in result.output



def test_evaluate_adapt_on_several_k_in_one_run(mobile_sam_checkpoint, tmp_path):
    """`--adapt-on 2,3` on two categories of four GrabCut objects: the base runs once on the rest of K = 2; each K
    learns and is measured on its own rest (two objects per category for K = 2, one for K = 3), its `adaptation.base`
    is the base model's figures on exactly those objects, and adaptation_curve.csv has a row per K."""
    import csv

    from click.testing import CliRunner

    from sam_backend.commands.cli import main

    data, images = _categories_coco(tmp_path, 4)
    out = tmp_path / "out"
    env = {"SAM_CHECKPOINT": str(mobile_sam_checkpoint), "SAM_PRECISION": "fp32", "SAM_ENCODER": "eager",
           "SAM_ADAPT_STEPS": "4"}
    result = CliRunner(env=env).invoke(main, ["evaluate", str(data), "--images", str(images),
                                              "--adapt-on", "3,2", "--max-clicks", "3", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    name = "sam/vit_t/fp32/clicks"
    assert set(summary) == {name, f"{name}/adapted@2", f"{name}/adapted@3"}
    assert summary[name]["objects"] == summary[f"{name}/adapted@2"]["objects"] == 4
    assert summary[f"{name}/adapted@3"]["objects"] == 2
    rows = list(csv.DictReader((out / "per_object.csv").open()))
    base_noc = {r["object"]: int(r["noc90"]) for r in rows if r["configuration"] == name}
    for k, per_category in ((2, 2), (3, 1)):
        learning = summary[f"{name}/adapted@{k}"]["adaptation"]
        assert learning["k"] == k and learning["groups"] == 2
        assert all(g["trained_on"] + g["held_out"] == k for g in learning["per_group"].values())
        assert all(g["rss_growth_mb"] >= 0 for g in learning["per_group"].values())
        measured = [r["object"] for r in rows if r["configuration"] == f"{name}/adapted@{k}"]
        assert len(measured) == 2 * per_category
        assert learning["base"]["objects"] == len(measured)
        assert learning["base"]["noc90"] == pytest.approx(sum(base_noc[o] for o in measured) / len(measured),
                                                          abs=1e-3)
    curve = list(csv.DictReader((out / "adaptation_curve.csv").open()))
    assert [int(r["k"]) for r in curve] == [2, 3]
    assert [float(r["base_noc90"]) for r in curve] == [summary[f"{name}/adapted@{k}"]["adaptation"]["base"]["noc90"]
                                                       for k in (2, 3)]
    bad = CliRunner(env=env).invoke(main, ["evaluate", str(data), "--adapt-on", "2,x", "-o", str(out)])
    assert bad.exit_code == 2 and "expected whole numbers separated by commas" in bad.output


def test_peak_rss_sees_growth_below_an_earlier_peak():
    """`PeakRss` measures a block's own growth: 150 MB touched inside it read as ~150 MB even after the process had
    already peaked higher (where `ru_maxrss` would read no growth at all)."""
    from sam_backend.commands.rss import PeakRss

    big = np.ones(400 * 2**20, np.uint8)  # an earlier, higher peak
    del big
    with PeakRss(interval_s=60.0) as peak:  # sampled by the call below, not by the clock
        block = np.ones(150 * 2**20, np.uint8)
        peak.sample()
        del block
    assert 120 <= peak.growth_mb <= 260, peak.growth_mb

def test_a_training_step_waits_while_a_click_is_in_flight():
    """`Activity.wait_idle` blocks a training step while a click is in flight and lets it go once clicks stop."""
    from sam_backend.serving.adapters import Activity

    activity = Activity(quiet_s=0.05)
    released = threading.Event()

    def step() -> None:
        activity.wait_idle()
        released.set()

    with activity.click():
        worker = threading.Thread(target=step)
        worker.start()
        time.sleep(0.2)
        assert not released.is_set()
    worker.join(5)
    assert released.is_set()


# -- through the real Label Studio ------------------------------------------------------------------------------------

@pytest.mark.integration
def test_annotations_submitted_in_label_studio_teach_the_backend(mobile_sam_checkpoint, tmp_path):
    """The real Label Studio 1.23.2: connecting the backend makes Label Studio create its project webhook, which is
    registered with the backend's `SAM_WEBHOOK_SECRET`; five annotations submitted through Label Studio's API (brush
    masks of the object) reach `/webhook`, the backend reads each back from Label Studio and learns from them, and the
    next smart click through Label Studio gets the whole object with the adapted model's version, where the base
    model took a part. A forged body (an annotation Label Studio does not hold) is not learnt from."""
    import io

    import requests
    from PIL import Image
    from test_integration_labelstudio import BackendThread, keypoint

    from sam_backend.labelstudio.brush import decode_brush
    from sam_backend.labelstudio.process import LabelStudio
    from sam_backend.segment.simulator import iou

    image, mask = real_photo("GrabCut", PHOTO)
    h, w = mask.shape
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    ls = LabelStudio(tmp_path / "ls", "admin@example.com", "adapt-Passw0rd").start()
    settings = Settings.from_env({
        "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat, "SAM_CHECKPOINT": str(mobile_sam_checkpoint),
        "SAM_DECODER": "onnx", "SAM_ENCODER": "eager", "SAM_PRECISION": "fp32", "SAM_ADAPT": "true",
        "SAM_ADAPTER_DIR": str(tmp_path / "adapters"), "SAM_ADAPT_STEPS": "80", "SAM_WEBHOOK_SECRET": "hook-s3cret",
        "SAM_METADATA_DB": str(tmp_path / "sidecar.db")})
    from sam_backend.segment.engines.factory import make_engine

    backend = BackendThread(settings, lambda: make_engine(settings)).start()
    try:
        config = (Path(__file__).parents[1] / "label_config" / "smart-tools-brush.xml").read_text()
        project = ls.create_project("adapt", config)
        tasks = ls.upload(project, {f"photo{i}.png": buf.getvalue() for i in range(6)})
        ml = ls.add_ml_backend(project, backend.url)
        ls.register_webhook(project, backend.url, "hook-s3cret")
        x, y, _ = first_click(mask)
        click = [keypoint(x, y, w=w, h=h)]

        def answer_mask(answer: dict) -> np.ndarray:
            [region] = answer["data"]["result"]
            return decode_brush(region["value"]["rle"], region["original_width"], region["original_height"])

        assert iou(answer_mask(ls.interactive(ml, tasks[5], click)), mask) < 0.5  # the base model takes a part
        region = {"id": "m1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w,
                  "original_height": h, "image_rotation": 0,
                  "value": {"format": "rle", "rle": encode_brush(mask), "brushlabels": ["Object"]}}
        for task in tasks[:5]:
            ls.call("POST", f"/api/tasks/{task}/annotations/", json={"result": [region]})
        # Label Studio posts its webhooks before it answers: learning is queued now; drive it to its end.
        assert backend.backend.adapters.settle(600)
        status = requests.get(backend.url + "/health", timeout=10).json()["adapt"]["projects"][str(project)]
        assert status["version"] == 1 and status["accepted_masks"] == 5 and status["learnt_from"] == 4
        forged = {"action": "ANNOTATION_CREATED", "project": {"id": project}, "task": {"id": tasks[5]},
                  "annotation": {"id": 999_999, "task": tasks[5], "result": [region]}}
        resp = requests.post(backend.url + "/webhook", json=forged, headers={"X-SAM-Webhook-Secret": "hook-s3cret"},
                             timeout=30)
        assert resp.status_code == 200 and resp.json()["kept"] == 0
        adapt = requests.get(backend.url + "/health", timeout=10).json()["adapt"]
        assert adapt["skipped"].get("unverified") == 1 and adapt["projects"][str(project)]["accepted_masks"] == 5
        answer = ls.interactive(ml, tasks[5], click)
        assert iou(answer_mask(answer), mask) > 0.9
        assert answer["data"]["model_version"].endswith(f"-adapted-p{project}-v1")
        # The annotator accepts it; the team's report splits the figures at the version and marks it.
        from sam_backend.sidecar.report import build_report

        [answered] = answer["data"]["result"]
        ls.call("POST", f"/api/tasks/{tasks[5]}/annotations/", json={"result": [dict(answered, origin="prediction")]})
        backend.recorder.flush()
        made = build_report(project, tmp_path / "report", settings.metadata_db, ls.url, ls.pat, adapt=True,
                            progress=False)
        base, v1 = made.data["by_version"]
        assert (base["version"], base["objects"], base["answers"]) == (0, 0, 1)  # the base's click was not kept
        assert (v1["version"], v1["objects"], v1["answers"], v1["accepted_as_answered"]) == (1, 1, 1, 1.0)
        assert v1["went_live"] and v1["held_out"]["objects"] == 1 and v1["trained_on"] == 4
        assert made.data["totals"]["hand_drawn"] == 5  # the five masks submitted without a click
        assert "Adapted decoder versions" in made.html.read_text()
    finally:
        backend.stop()
        backend.backend.adapters.stop()
        ls.stop()



def test_an_engine_without_a_sam_decoder_keeps_masks_says_why_and_stays_idle(tmp_path, ls):
    """SAM_ADAPT with GrabCut (no mask decoder to learn): webhooks are still answered and their masks kept; /health
    says why nothing is learnt; clicks keep the engine's own version; and the idle backend does not spin (it re-queued
    its training without end: a whole core busy)."""
    from sam_backend.serving.app import create_app

    image, mask = real_photo("GrabCut", PHOTO)
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    settings = Settings.from_env({"SAM_ENGINE": "grabcut", "SAM_ADAPT": "true", "LOCAL_FILES_DOCUMENT_ROOT":
                                  str(tmp_path), "SAM_ADAPTER_DIR": str(tmp_path / "locks"),
                                  "SAM_METADATA_DB": str(tmp_path / "sidecar.db"), **ls.env()})
    client = create_app(settings).test_client()
    for n in range(1, 8):
        assert client.post("/webhook", json=ls.annotate(5, n, "photo.png", mask)).status_code == 200
    adapt = _settle(client)
    assert "SAM_ENGINE=sam" in adapt["unsupported"] and adapt["projects"]["5"]["accepted_masks"] == 7
    assert adapt["projects"]["5"]["version"] is None and adapt["projects"]["5"]["state"] == "idle"
    thread = client.application.extensions["sam_backend"].adapters.trainer._thread
    clock = time.pthread_getcpuclockid(thread.ident)
    cpu = time.clock_gettime(clock)
    time.sleep(1.0)
    assert thread.is_alive() and time.clock_gettime(clock) - cpu < 0.2  # the training thread idles, not spins
    assert "-adapted-" not in _click(client, 5, "photo.png", mask)["model_version"]


def test_an_accepted_region_that_claims_gigabytes_is_skipped_with_bounded_memory(tmp_path, ls):
    """Label Studio holds an annotation whose brush RLE header claims 2^31 values for a 64 × 48 region, and one of
    20000 × 20000 pixels: both skipped (`bad_region`) before anything is allocated; the webhook answers 200."""
    import tracemalloc

    from ls_standin import brush_region

    from sam_backend.serving.app import create_app

    settings = Settings.from_env({"SAM_ENGINE": "grabcut", "SAM_ADAPT": "true", "LOCAL_FILES_DOCUMENT_ROOT":
                                  str(tmp_path), "SAM_ADAPTER_DIR": str(tmp_path / "locks"),
                                  "SAM_METADATA_DB": str(tmp_path / "sidecar.db"), **ls.env()})
    client = create_app(settings, start=False).test_client()
    bomb = brush_region("a", np.ones((48, 64), bool))
    bomb["value"]["rle"] = list((2**31).to_bytes(4, "big")) + bomb["value"]["rle"][4:]
    huge = brush_region("b", np.ones((48, 64), bool))
    huge.update(original_width=20000, original_height=20000)
    body = ls.annotate(6, 1, "photo.png", regions=[bomb, huge])
    tracemalloc.start()
    try:
        resp = client.post("/webhook", json=body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status_code == 200 and resp.json["kept"] == 0
    assert any("declares 2147483648 values" in s for s in resp.json["skipped"])
    assert any("SAM_MAX_IMAGE_PIXELS" in s for s in resp.json["skipped"])
    assert peak < 50 * 2**20


def test_learning_encodes_never_push_an_annotators_embedding_out(tmp_path):
    """Learning reads the click cache where it has an image (without filling it) and encodes the rest into a cache of
    its own: with a click cache that holds one embedding, an annotator's stays there while learning encodes two more
    images at its own priority."""
    from sam_backend.labelstudio.images import ImageFetcher
    from sam_backend.segment.engines.grabcut import GrabCutEngine
    from sam_backend.serving.adapt_trainer import LearningEmbeddings
    from sam_backend.serving.cache import EmbeddingCache
    from sam_backend.serving.encoder import Encoder
    from sam_backend.serving.memory import ImageMemory

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"p{i}.png"), np.full((40, 60, 3), 40 * i, np.uint8))
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    engine, fetcher, encoder, images = GrabCutEngine(), ImageFetcher(settings), Encoder(), ImageMemory()
    annotator = fetcher.load("p0.png")
    size = engine.embed(annotator.pixels).nbytes
    clicks = EmbeddingCache(size)  # room for one embedding: the annotator's
    clicks.put((engine.engine_id, annotator.sha256), engine.embed(annotator.pixels))
    images.remember(engine.engine_id, "p0.png", annotator.sha256)
    learn = LearningEmbeddings(clicks, images, fetcher, encoder, budget_bytes=4 * size)
    assert learn("p0.png", engine) is clicks.get((engine.engine_id, annotator.sha256))  # read from the click cache
    learn("p1.png", engine), learn("p2.png", engine)
    assert (engine.engine_id, annotator.sha256) in clicks and clicks.stats().entries == 1
    assert learn.own.stats().entries == 2


def test_an_adapted_version_runs_on_the_base_decoder_path_and_a_newer_one_is_built_off_the_click_path(
        mobile_sam_checkpoint, tmp_path):
    """An adapted decoder runs on the base's decoder path (here ONNX Runtime: its own graph, whose masks match its own
    eager decoder), so an adapted project clicks as fast as the base. A version published while the project is served
    (by the base, then by v1) is built on a thread of its own: the click that finds it is answered by what served,
    and the new version serves once built (driven to its end with `settle`, not a clock). The first click after a
    start builds in place (`..._survives_a_restart`)."""
    from sam_backend.segment.engines.factory import make_engine
    from sam_backend.segment.prompts import ObjectPrompt
    from sam_backend.segment.simulator import iou
    from sam_backend.serving.adapt_versions import Versions, weights_of
    from sam_backend.sidecar.learning import LearningStore
    from sam_backend.sidecar.store import Store

    settings = Settings.from_env({"SAM_CHECKPOINT": str(mobile_sam_checkpoint), "SAM_DECODER": "onnx",
                                  "SAM_ENCODER": "eager", "SAM_PRECISION": "fp32",
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    base = make_engine(settings)
    assert base.decoder_kind == "onnx"
    store = LearningStore(Store(tmp_path / "s.db"), tmp_path / "locks")
    decoder = A.adapted_decoder(base)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.startswith(A.TRAINABLE):
                p.add_(torch.randn_like(p) * 1e-3, alpha=1.0)  # a learnt decoder: not the released one
    state = {n: p.detach() for n, p in decoder.named_parameters() if n.startswith(A.TRAINABLE)}
    packed = A.pack_version(state, {"weights": weights_of(base)})
    versions = Versions(store, sync_s=0.0)
    assert versions.engine_for("3", base) is base  # no version yet: the base serves
    store.publish("3", weights_of(base), packed, {"trained_on": 4}, keep=3)
    assert versions.engine_for("3", base) is base  # v1 is built on a thread of its own; the base goes on serving
    versions.settle()
    first = versions.engine_for("3", base)
    assert first.adapter_version == "p3-v1" and first.decoder_kind == "onnx"
    image, mask = real_photo("GrabCut", PHOTO)
    embedding = base.embed(image)
    x, y, _ = first_click(mask)
    prompt = ObjectPrompt(np.array([[x, y]]), np.array([1]), None, "o", None, None, (mask.shape[1], mask.shape[0]))
    fast = first.predict_with(first.fast_decoder, embedding, prompt)
    slow = first.predict_with(None, embedding, prompt)
    assert iou(fast.best_mask, slow.best_mask) >= 0.999 and fast.best == slow.best
    assert not np.array_equal(slow.low_res_logits, base.predict_with(None, embedding, prompt).low_res_logits)

    store.publish("3", weights_of(base), packed, {"trained_on": 9}, keep=3)
    assert versions.engine_for("3", base) is first  # answered by v1 while v2 is built
    versions.settle()
    second = versions.engine_for("3", base)
    assert second.adapter_version == "p3-v2" and second.decoder_kind == "onnx" and versions.number("3") == 2
