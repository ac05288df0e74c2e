"""Learning from accepted masks: fine-tune SAM's mask decoder on one group of objects (a project's accepted masks,
or one category), with prompts made the way annotators click, and keep the result only where it does better on
masks it was not trained on.

Frames: a mask is `(H, W) bool` in image pixels; an embedding is the engine's (`image_embed` `(1, C, g, g)`); the
decoder's low-res logits are `(256, 256)` over the encoder's padded square input (the image resized so its longest
side is the encoder's input size, padded right and bottom). The loss is computed there: the true mask is resized and
padded the same way and area-averaged to `256 × 256` (a soft target), the padding and ignored pixels weigh nothing.

Training prompts come from the standard simulator (`segment.simulator`) run with the model being adapted from:
the first click at the object's deepest point and the corrective clicks after it (each seeded with the previous
low-res logits, as clicks are served), the object's box and the corrective clicks after the box, and first clicks at
random points inside the object (annotators do not click at the deepest point). A lone first click is trained as
SAM was: the best of its three candidates against the mask, and every candidate's score against its true IoU, so
that the candidate the product picks (the highest score) is the right one for this kind of object.

Only `TRAINABLE` parts of the decoder change (see `TRAINABLE`); a version is the state of those tensors
(`pack_version` / `unpack_version`: `torch.save` bytes, read back with `weights_only=True`).
"""

from __future__ import annotations

import copy
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from sam_backend.segment.embedding import Embedding
from sam_backend.segment.prompts import ObjectPrompt
from sam_backend.segment.simulator import Click, first_click, iou, mean_iou_curve, next_click, noc

if TYPE_CHECKING:
    from sam_backend.segment.engines.sam import SamEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

# The decoder's parts that learn (prefixes of `MaskDecoder` parameter names): the per-candidate MLPs that turn a mask
# token into the mask's weights, and the IoU head. The two-way transformer, the tokens and the upscaling stay as
# released, so no gradient flows through them (a step costs ~33 ms on two cores instead of ~84 with the tokens and
# upscaling learning) and they gave fewer clicks, not more: see the README's "The model learns from the team".
TRAINABLE = ("output_hypernetworks_mlps", "iou_prediction_head")
EARLIER_PARTS = TRAINABLE + ("output_upscaling", "mask_tokens", "iou_token")  # what learnt before: for comparisons
VERSION_FORMAT = 1


class AdaptError(ValueError):
    """The input cannot be learnt from (the message says what was expected and what arrived); `reason` is a short
    label for counting (`size_mismatch`, `empty`, `bad_version`, ...)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AdaptConfig:
    """How one version is trained and judged."""

    steps: int = 150  # optimizer steps (one prompt each)
    lr: float = 5e-5
    weight_decay: float = 1e-4
    train_clicks: int = 8  # simulated clicks per object whose prompts are trained on
    random_clicks: int = 3  # extra first clicks at random points inside each object
    rounds: int = 2  # the simulated runs are made again with the decoder being trained, this many times in all
    judge_clicks: int = 20  # the held-out protocol's click limit
    seed: int = 0
    parts: tuple[str, ...] = TRAINABLE  # prefixes of the decoder's parameter names that learn


@dataclass
class Example:
    """One accepted object: its image's embedding and its true `(H, W) bool` mask (`ignore`: pixels that count in
    neither the loss nor the IoU)."""

    embedding: Embedding
    mask: np.ndarray
    ignore: np.ndarray | None = None
    key: str = ""

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or mask.dtype != np.bool_:
            raise AdaptError(f"mask: expected an (H, W) bool array, got {mask.shape} {mask.dtype}")
        if mask.shape != self.embedding.image_size.shape:
            raise AdaptError(f"mask: expected the image's size {self.embedding.image_size.shape} (H, W), got "
                             f"{mask.shape}", "size_mismatch")
        if not mask.any():
            raise AdaptError("mask: the region is empty", "empty")


@dataclass
class TrainPrompt:
    """One prompt of a simulated run: `prompt`, the previous low-res logits `(256, 256)` it was seeded with (or
    None), and whether it asks for three candidates (a lone first click)."""

    example: int
    prompt: ObjectPrompt
    prev_logits: np.ndarray | None
    multimask: bool


JUDGE_MARGIN_CLICKS = 2.0  # see `Scores.kept_over`


@dataclass(frozen=True)
class Scores:
    """Held-out figures (see `score`): mean NoC@90 over the runs (a failure counts `judge_clicks`), failed runs, mean
    IoU over the first five interactions, and the number of objects."""

    objects: int
    noc90: float
    failures: int
    miou5: float

    def kept_over(self, base: Scores) -> bool:
        """Whether a version with these scores replaces `base` (the scores of what serves now on the same held-out
        runs): never more failed runs, and NoC@90 no more than `JUDGE_MARGIN_CLICKS / sqrt(objects)` above the
        base's (one held-out object: 2 clicks, four: 1, the newest twenty: 0.45). A few objects are a noisy judge:
        requiring a version to be strictly better on one object refused as many good versions as bad ones."""
        if self.failures > base.failures:
            return False
        return self.noc90 <= base.noc90 + JUDGE_MARGIN_CLICKS / max(1, self.objects) ** 0.5 + 1e-9

    def to_json(self) -> dict[str, Any]:
        return {"objects": self.objects, "noc90": round(self.noc90, 3), "failures": self.failures,
                "miou5": round(self.miou5, 4)}


@dataclass
class Outcome:
    """What one adaptation gave: the trained state, its held-out scores against the base, and the cost."""

    state: dict[str, torch.Tensor]
    base: Scores | None
    adapted: Scores | None
    accepted: bool
    trained_on: int
    seconds: float
    steps: int


HOLD_OUT_EVERY = 5  # every fifth accepted object (by arrival) is held out to judge a version


def split_held_out(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """`(train, held out)`: every `HOLD_OUT_EVERY`-th item (5th, 10th, ...) is held out, the rest trained on; the
    rule is by position, so an object held out once stays held out as more arrive."""
    train = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    held = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    return train, held


def training_steps(trained_on: int, base_steps: int) -> int:
    """Optimizer steps of one training on `trained_on` objects: `base_steps` up to five objects, ten more per object
    after that, at most four times `base_steps` (the backend and `evaluate --adapt-on` both train by this)."""
    return min(4 * base_steps, base_steps + 10 * max(0, trained_on - 5))


def training_set(items: Sequence[T], cap: int, seed: int = 0) -> list[T]:
    """At most `cap` of `items` (oldest first) in their order: the newest half of the cap, and an even sample of
    the older ones for the rest (seeded), so a training's cost stays bounded over a project's life."""
    if cap <= 0 or len(items) <= cap:
        return list(items)
    newest = max(1, cap // 2)
    older = len(items) - newest
    chosen = np.sort(np.random.default_rng(seed).choice(older, cap - newest, replace=False))
    return [items[int(i)] for i in chosen] + list(items[older:])


# -- the simulator on the engine ------------------------------------------------------------------------------

def _prompt(clicks: list[Click], box: np.ndarray | None, size: Any) -> ObjectPrompt:
    pts = np.array([(x, y) for x, y, _ in clicks], np.float32).reshape(-1, 2)
    labels = np.array([int(p) for _, _, p in clicks], np.int32)
    return ObjectPrompt(pts, labels, box, None, None, None, size)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """`(4,) float32` pixel XYXY box of a non-empty `(H, W) bool` mask (edges at pixel borders)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def simulate(engine: SamEngine, example: Example, protocol: str = "clicks", max_clicks: int = 20,
             stop_iou: float | None = None, min_clicks: int = 0,
             first: Click | None = None) -> tuple[list[float], list[TrainPrompt]]:
    """The standard simulator on `engine.predict` (the model's own best mask, seeded with its previous logits):
    `(IoU after each interaction, the prompts it sent)`. `protocol` `box` sends the object's box first; `first`
    replaces the deepest-point first click. Stops early at a perfect mask, or once IoU ≥ `stop_iou` after at least
    `min_clicks` interactions."""
    mask, size = example.mask, example.embedding.image_size
    ious: list[float] = []
    prompts: list[TrainPrompt] = []
    clicks: list[Click] = []
    box = mask_box(mask) if protocol == "box" else None
    prediction = np.zeros(mask.shape, bool)
    prev: np.ndarray | None = None
    for k in range(max_clicks):
        if not (k == 0 and box is not None):
            click = (first or first_click(mask)) if k == 0 else next_click(prediction, mask, example.ignore)
            if click is None:
                break
            clicks.append(click)
        prompt = _prompt(clicks, box, size)
        multimask = prev is None and box is None and len(clicks) == 1
        prompts.append(TrainPrompt(0, prompt, prev, multimask))
        pred = engine.predict(example.embedding, prompt, prev_logits=prev)
        best = pred.best
        prev = pred.low_res_logits[best] if pred.low_res_logits is not None else None
        prediction = pred.best_mask
        ious.append(iou(prediction, mask, example.ignore))
        if stop_iou is not None and ious[-1] >= stop_iou and len(ious) >= min_clicks:
            break
    return ious, prompts


JUDGE_RANDOM_CLICKS = 6  # held-out runs from a random point inside the object, besides the standard two (fewer: a
#                            single held-out object decides by where its one or two random clicks fell)


def random_inner_click(mask: np.ndarray, rng: np.random.Generator) -> Click:
    """A positive click at a random pixel of `mask` at least 2 px inside it (anywhere in it if it is thinner)."""
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    ys, xs = np.nonzero(inner if inner.any() else mask)
    j = int(rng.integers(len(xs)))
    return xs[j] + 0.5, ys[j] + 0.5, True


def score(engine: SamEngine, examples: Sequence[Example], max_clicks: int = 20, seed: int = 0,
          pause: Callable[[], None] | None = None) -> Scores:
    """`Scores` over held-out `examples`, each run the ways annotators start: the clicks protocol (deepest point
    first), the box protocol, and `JUDGE_RANDOM_CLICKS` runs from a random point inside the object (seeded: base and
    candidate see the same clicks). NoC@90 and failures over every run; mIoU over the first five interactions (a run
    stops once it reaches 0.90 after five). `pause()` runs before each run (the backend yields to clicks there)."""
    runs: list[list[float]] = []
    for i, ex in enumerate(examples):
        rng = np.random.default_rng(seed + i)
        starts = [("clicks", None), ("box", None)]
        starts += [("clicks", random_inner_click(ex.mask, rng)) for _ in range(JUDGE_RANDOM_CLICKS)]
        for protocol, start in starts:
            if pause is not None:
                pause()
            runs.append(simulate(engine, ex, protocol, max_clicks, stop_iou=0.90, min_clicks=5, first=start)[0])
    if not runs:
        return Scores(0, 0.0, 0, 0.0)
    nocs = [noc(ious, 0.90, max_clicks) for ious in runs]
    return Scores(len(examples), float(np.mean([k for k, _ in nocs])), sum(not ok for _, ok in nocs),
                  float(np.mean(mean_iou_curve(runs, 5))))


def training_prompts(engine: SamEngine, examples: Sequence[Example], config: AdaptConfig, seed: int = 0,
                     random_clicks: bool = True, pause: Callable[[], None] | None = None) -> list[TrainPrompt]:
    """Prompts of the simulated runs on every example (clicks protocol, box protocol, random first clicks);
    `pause()` runs before each example."""
    rng = np.random.default_rng(config.seed + seed)
    out: list[TrainPrompt] = []
    for i, ex in enumerate(examples):
        if pause is not None:
            pause()
        for protocol, clicks in (("clicks", config.train_clicks), ("box", max(1, config.train_clicks - 2))):
            _, prompts = simulate(engine, ex, protocol, clicks)
            out.extend(TrainPrompt(i, p.prompt, p.prev_logits, p.multimask) for p in prompts)
        if not random_clicks:
            continue
        for _ in range(config.random_clicks):
            prompt = _prompt([random_inner_click(ex.mask, rng)], None, ex.embedding.image_size)
            out.append(TrainPrompt(i, prompt, None, True))
    return out


# -- training ---------------------------------------------------------------------------------------------------

def low_res_target(engine: SamEngine, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """`(target, weight)`, each `(256, 256) float32`: the true mask resized and padded as the image was, area-averaged
    to the decoder's low-res frame; weight 0 on padding and on ignored pixels."""
    low = 4 * engine.model.prompt_encoder.image_embedding_size[0]
    side = engine.model.image_encoder.img_size
    h_in, w_in = example.embedding.meta["input_size"]
    frame = np.zeros((side, side), np.float32)
    frame[:h_in, :w_in] = cv2.resize(example.mask.astype(np.float32), (w_in, h_in), interpolation=cv2.INTER_AREA)
    valid = np.zeros((side, side), np.float32)
    valid[:h_in, :w_in] = 1.0
    if example.ignore is not None:
        valid[:h_in, :w_in] *= 1.0 - cv2.resize(example.ignore.astype(np.float32), (w_in, h_in),
                                                interpolation=cv2.INTER_AREA)
    target = cv2.resize(frame, (low, low), interpolation=cv2.INTER_AREA)
    weight = (cv2.resize(valid, (low, low), interpolation=cv2.INTER_AREA) > 0.5).astype(np.float32)
    return torch.from_numpy(target), torch.from_numpy(weight)


def adapted_decoder(engine: SamEngine, state: dict[str, torch.Tensor] | None = None,
                    parts: tuple[str, ...] = TRAINABLE) -> torch.nn.Module:
    """A copy of `engine`'s mask decoder with `state` (a version's tensors) loaded over it, in eval mode. The parts
    that never learn (the two-way transformer, the tokens, the upscaling: 3.4 M of MobileSAM's 4.1 M decoder
    parameters) are shared with the released decoder, not copied: a version costs the memory of its `parts` only."""
    base = engine.base_mask_decoder
    learnt = tuple(parts) + tuple(state or ())  # a version of an earlier release may hold more: copied, not shared
    frozen = {id(child): child for name, child in base.named_children()
              if not any(f"{name}.".startswith(prefix) or prefix.startswith(f"{name}.") for prefix in learnt)}
    decoder = copy.deepcopy(base, memo=frozen)
    if state:
        own = dict(decoder.named_parameters())
        for name, tensor in state.items():
            if name not in own:
                raise AdaptError(f"adapter tensor {name}: expected a parameter of the mask decoder")
            if own[name].shape != tensor.shape:
                raise AdaptError(f"adapter tensor {name}: expected shape {tuple(own[name].shape)}, got "
                                 f"{tuple(tensor.shape)}")
            with torch.no_grad():
                own[name].copy_(tensor.to(own[name].device, own[name].dtype))
    for p in decoder.parameters():  # the shared parts too: no gradient ever flows into the released weights
        p.requires_grad_(False)
    return decoder.eval()


def _loss(logits: torch.Tensor, scores: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
          ) -> torch.Tensor:
    """Per candidate (`logits (T, 256, 256)`, `scores (T,)`): BCE + dice against the soft `target`, plus the squared
    error of the score against the candidate's true IoU; the best candidate's mask loss counts (SAM's rule)."""
    total = weight.sum().clamp(min=1.0)
    bce = (F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none") * weight
           ).flatten(1).sum(1) / total
    prob = torch.sigmoid(logits) * weight
    dice = 1 - (2 * (prob * target).flatten(1).sum(1) + 1) / (prob.flatten(1).sum(1) + (target * weight).sum() + 1)
    with torch.no_grad():
        hard = (logits > 0).float() * weight
        true = (target > 0.5).float() * weight
        inter, union = (hard * true).flatten(1).sum(1), ((hard + true) > 0).float().flatten(1).sum(1)
        true_iou = torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))
    mask_loss = bce + dice
    return mask_loss.min() + F.mse_loss(scores, true_iou)


def fine_tune(engine: SamEngine, examples: Sequence[Example], config: AdaptConfig = AdaptConfig(),
              pause: Callable[[], None] | None = None, progress: Callable[[int, int], None] | None = None
              ) -> dict[str, torch.Tensor]:
    """Train `config.parts` (`TRAINABLE`) of a copy of the released decoder on `examples`; returns their state (CPU
    tensors). `pause()` runs before each step (the backend waits there while clicks are served);
    `progress(step, steps)`."""
    if not examples:
        raise AdaptError("examples: expected at least one accepted mask, got none")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    prompts = training_prompts(engine, examples, config, pause=pause)
    targets = [low_res_target(engine, ex) for ex in examples]
    parts = tuple(config.parts)
    decoder = adapted_decoder(engine, None, parts)
    params = []
    for name, p in decoder.named_parameters():
        if name.startswith(parts):
            p.requires_grad_(True)
            params.append(p)
    decoder.train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    prompt_encoder = engine.model.prompt_encoder
    dense_pe = prompt_encoder.get_dense_pe().detach()
    features = [ex.embedding.features["image_embed"] for ex in examples]
    features = [(f if isinstance(f, torch.Tensor) else torch.as_tensor(f)).detach().clone().float()
                for f in features]
    # The corrective clicks an annotator makes depend on the masks the model gives: after each round, the runs are
    # simulated again with the decoder as trained so far (what the base model got right, the adapted one must
    # not break at the next click), and their prompts join the pool.
    rounds = {int(config.steps * r / config.rounds) for r in range(1, max(1, config.rounds))}
    with torch.enable_grad():
        for step in range(config.steps):
            if pause is not None:
                pause()
            if step in rounds:
                current = engine.with_mask_decoder(decoder, None, fallback=False)  # its own mistakes
                prompts.extend(training_prompts(current, examples, config, seed=step, random_clicks=False,
                                                pause=pause))
                decoder.train()
            item = prompts[int(rng.integers(len(prompts)))]
            inputs = engine.prompt_tensors(examples[item.example].embedding, item.prompt, item.prev_logits)
            with torch.no_grad():
                sparse, dense = prompt_encoder(points=inputs[0], boxes=inputs[1], masks=inputs[2])
            low_res, scores = decoder(image_embeddings=features[item.example].to(engine.device), image_pe=dense_pe,
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=item.multimask)
            target, weight = targets[item.example]
            loss = _loss(low_res[0].float(), scores[0].float(), target.to(engine.device), weight.to(engine.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(step + 1, config.steps)
    return {n: p.detach().cpu().clone() for n, p in decoder.named_parameters() if n.startswith(parts)}


def adapt(engine: SamEngine, train: Sequence[Example], held_out: Sequence[Example],
          config: AdaptConfig = AdaptConfig(), pause: Callable[[], None] | None = None,
          progress: Callable[[int, int], None] | None = None) -> Outcome:
    """Fine-tune on `train`, then judge on `held_out` (base engine against adapted, `Scores.kept_over`); with no
    held-out object the version is accepted untested (`evaluate --adapt-on` measures it on the rest)."""
    t0 = time.perf_counter()
    state = fine_tune(engine, train, config, pause, progress)
    base = adapted = None
    accepted = True
    if held_out:
        candidate = engine.with_mask_decoder(adapted_decoder(engine, state), "candidate")
        base = score(engine, held_out, config.judge_clicks, pause=pause)
        adapted = score(candidate, held_out, config.judge_clicks, pause=pause)
        accepted = adapted.kept_over(base)
    return Outcome(state, base, adapted, accepted, len(train), time.perf_counter() - t0, config.steps)


# -- versions as bytes ------------------------------------------------------------------------------------------

def pack_version(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """A version's bytes: the trained tensors and JSON-ready `meta` (`torch.save`; read with `unpack_version`)."""
    buf = io.BytesIO()
    torch.save({"format": VERSION_FORMAT, "state": {k: v.cpu() for k, v in state.items()}, "meta": meta}, buf)
    return buf.getvalue()


def unpack_version(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(state, meta)` from `pack_version` bytes; `AdaptError` for anything else (never unpickles code)."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: not a version file
        raise AdaptError(f"not an adapter version file ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != VERSION_FORMAT or not isinstance(obj.get("state"), dict):
        raise AdaptError(f"not an adapter version file: expected format {VERSION_FORMAT}")
    state = obj["state"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdaptError("adapter version file: expected named tensors")
    return state, dict(obj.get("meta") or {})
