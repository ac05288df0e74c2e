"""Side by side, on real photos and real weights: how the mask of each click is chosen and cleaned up.

Runs the standard click simulator straight on the engine (no HTTP, no RLE: only the choices differ), one embedding
per image shared by every strategy, and prints NoC@85 / NoC@90 / failures@90 / mIoU@1..5 and the largest drop of
mIoU from one interaction to the next, per strategy and protocol:

    python benchmarks/tune_clicks.py ../shared/evaldata/GrabCut --checkpoint checkpoints/mobile_sam.pt

A strategy: `feedback` (the previous low-res logits as the mask prompt; `no-box`: only without a box), `guard` (the
collapse guard that was tried: on every corrective click or on negative ones), `refine` (a clean-up, or none).
Choosing among all four decoder tokens by the clicks, tried in the same round, measured worse and needed a hook in
the engine; it is not kept (README, "Quality on standard benchmarks").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sam_backend.commands.evalsets import load_objects  # noqa: E402
from sam_backend.config import RefineSettings  # noqa: E402
from sam_backend.segment.engines.sam import SamEngine  # noqa: E402
from sam_backend.segment.prompts import ObjectPrompt  # noqa: E402
from sam_backend.segment.refine import refine  # noqa: E402
from sam_backend.segment.simulator import first_click, iou, mean_iou_curve, next_click, noc  # noqa: E402

log = logging.getLogger("tune_clicks")

# The clean-up of the previous round (its defaults), spelled out: today's `RefineSettings()` is the clamp alone.
ROUND_BEFORE = RefineSettings(max_hole_px=256, min_island_px=256, keep_clicked=True)
STRATEGIES = {
    "plain": {"feedback": True, "guard": None, "refine": None},
    "product": {"feedback": True, "guard": None, "refine": RefineSettings()},
    "before": {"feedback": True, "guard": None, "refine": ROUND_BEFORE},
    "before-no-keep": {"feedback": True, "guard": None, "refine": replace(ROUND_BEFORE, keep_clicked=False)},
    "before-no-islands": {"feedback": True, "guard": None, "refine": replace(ROUND_BEFORE, min_island_px=0)},
    "before-no-holes": {"feedback": True, "guard": None, "refine": replace(ROUND_BEFORE, max_hole_px=0)},
    "holes-only": {"feedback": True, "guard": None, "refine": RefineSettings(max_hole_px=256)},
    "plain/guard": {"feedback": True, "guard": "every", "refine": None},
    "holes-only/negative-guard": {"feedback": True, "guard": "negative", "refine": RefineSettings(max_hole_px=256)},
    "product/box-no-feedback": {"feedback": "no-box", "guard": None, "refine": RefineSettings()},
}


def obeys(mask: np.ndarray, point: np.ndarray, positive: bool) -> bool:
    """Whether a click agrees with `mask`: a positive click on it, a negative one off it."""
    h, w = mask.shape
    x, y = int(np.clip(point[0], 0, w - 1)), int(np.clip(point[1], 0, h - 1))
    return bool(mask[y, x]) == positive


def collapsed(logits: np.ndarray, previous: np.ndarray, score: float) -> bool:
    """An answer that keeps under half of the previous one (low-res IoU < 0.5) while the model doubts it (predicted
    IoU < 0.8): the collapse the guard strategies try to catch (measured worse, not in the product)."""
    a, b = logits > 0, previous > 0
    union = np.logical_or(a, b).sum()
    overlap = 1.0 if union == 0 else np.logical_and(a, b).sum() / union
    return score < 0.8 and overlap < 0.5


def guard_collapse(engine: SamEngine, embedding, prompt: ObjectPrompt, feed):
    """`(prediction, index, keep previous)`: the collapse guard tried (the unseeded answer, else the previous)."""
    out = engine.predict(embedding, prompt, feed)
    if not collapsed(out.low_res_logits[out.best], feed, float(out.scores[out.best])):
        return out, out.best, False
    fresh = engine.predict(embedding, prompt, None)
    if (not collapsed(fresh.low_res_logits[fresh.best], feed, 0.0)
            and obeys(fresh.best_mask, prompt.points[-1], bool(prompt.labels[-1]))):
        return fresh, fresh.best, False
    return out, out.best, True


def run_object(engine: SamEngine, embedding, obj, strategy: dict, protocol: str, max_clicks: int) -> list[float]:
    h, w = obj.mask.shape
    ys, xs = np.nonzero(obj.mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32) if protocol == "box" else None
    clicks: list[tuple[float, float, bool]] = []
    prev = None
    pred = np.zeros((h, w), bool)
    ious = []
    for k in range(max_clicks):
        if not (k == 0 and box is not None):
            click = first_click(obj.mask) if k == 0 else next_click(pred, obj.mask, obj.ignore)
            if click is None:
                break
            clicks.append(click)
        pts = np.array([(x, y) for x, y, _ in clicks], np.float32).reshape(-1, 2)
        labels = np.array([int(p) for _, _, p in clicks], np.int32)
        prompt = ObjectPrompt(pts, labels, box, "o", None, None, (w, h))
        feed = prev if strategy["feedback"] is True or (strategy["feedback"] == "no-box" and box is None) else None
        guard = strategy["guard"] == "every" or (strategy["guard"] == "negative" and clicks and not clicks[-1][2])
        if guard and feed is not None:
            out, best, keep = guard_collapse(engine, embedding, prompt, feed)
            if keep:  # the previous answer stays
                ious.append(ious[-1])
                continue
        else:
            out = engine.predict(embedding, prompt, feed)
            best = out.best
        prev = out.low_res_logits[best]
        mask = out.mask(best)
        if strategy["refine"] is not None:
            cleaned = refine(mask, prompt, strategy["refine"])
            mask = cleaned if cleaned.any() else mask
        pred = mask
        ious.append(iou(pred, obj.mask, obj.ignore))
    return ious


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--strategy", action="append", choices=sorted(STRATEGIES))
    parser.add_argument("--protocol", action="append", choices=["clicks", "box"])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-clicks", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = SamEngine.from_checkpoint(args.checkpoint, device="cpu", precision=args.precision)
    engine.use_decoder("auto")
    objects = load_objects(args.data, None, args.limit)
    root = args.data / {"GrabCut": "data_GT"}.get(args.data.name, "images" if (args.data / "images").is_dir()
                                                      else "img")
    from sam_backend.labelstudio.images import decode_image

    embeddings: dict[str, object] = {}
    curves: dict[tuple[str, str], list[list[float]]] = {}
    t0 = time.perf_counter()
    for i, obj in enumerate(objects):
        if obj.image not in embeddings:
            embeddings.clear()
            embeddings[obj.image] = engine.embed(decode_image((root / obj.image).read_bytes(), 10**8))
        for protocol in args.protocol or ["clicks", "box"]:
            for name in args.strategy or list(STRATEGIES):
                curves.setdefault((name, protocol), []).append(
                    run_object(engine, embeddings[obj.image], obj, STRATEGIES[name], protocol, args.max_clicks))
        if (i + 1) % 10 == 0:
            log.info("%d/%d objects, %.0f s", i + 1, len(objects), time.perf_counter() - t0)
    for (name, protocol), per in curves.items():
        miou = mean_iou_curve(per, args.max_clicks)
        n90 = [noc(c, 0.90, args.max_clicks) for c in per]
        print(json.dumps({
            "set": args.data.name, "strategy": name, "protocol": protocol, "objects": len(per),
            "noc85": round(float(np.mean([noc(c, 0.85, args.max_clicks)[0] for c in per])), 3),
            "noc90": round(float(np.mean([k for k, _ in n90])), 3), "failures90": sum(not ok for _, ok in n90),
            "miou@1-5": [round(v, 4) for v in miou[:5]],
            "worst_drop": round(float(min(0.0, *np.diff(miou))) if len(miou) > 1 else 0.0, 4)}))


if __name__ == "__main__":
    main()
