"""`sam-backend evaluate`: clicks-to-quality on labeled data, per model and settings, with a plot.

Data: a Label Studio JSON export (brush RLE or polygons; each task's newest live annotation) or a COCO file
(RLE or polygon segmentations). Images: `--images DIR` (matched by file name), else the URLs the tasks hold,
fetched by the backend's own image loader (Label Studio's with `LABEL_STUDIO_URL` + `LABEL_STUDIO_API_KEY`).

Each object is segmented by the simulator of `sam_backend.segment.simulator`, and every prompt goes through
the path of a real click: a Label Studio-shaped `/predict` body (percent coordinates; all keypoints so far,
newest last; a rectangle alone) → `SamBackend` (object memory, logits feedback, refinement) → the brush RLE
Label Studio would receive, decoded back to a mask. `--backend URL` sends the same bodies to a running backend.
Each object is its own task, so one object's memory never leaks into another's.

Protocols: `clicks` (the first click at the object's deepest point, then corrective clicks) and `box` (the
object's bounding box first, then corrective clicks; interaction 1 is the box). NoC@85 / NoC@90 count
interactions; an object that never reaches the IoU counts `max_clicks` and a failure.

`adapt_on=K` (`--adapt-on K`) measures learning from accepted masks (`segment.adapt`, as `SAM_ADAPT` runs it in the
backend): objects are grouped by category (COCO `categories`, a Label Studio export's label, COCO-MVal's file names);
in each group the first K are taken as the team's accepted masks and learnt from by the backend's own rule (every
fifth held out, the version kept unless it does worse there), then the rest are measured twice: with the base
model and with the group's adapted one (`<configuration>/adapted`). The K objects are measured by neither.
Several K (`--adapt-on 3,5,10`) learn and measure each K in the same run (`<configuration>/adapted@K`, and
`adaptation_curve.csv`): the base model runs once on the rest of the smallest K, and each K is compared with it on
its own rest (a category with no more than K objects has none and sits that K out). The learning's cost is each
category's training and judging: `seconds_per_accepted_mask`, and `peak_rss_growth_mb`, the most resident memory
one training added (sampled while it ran).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import requests
from tqdm import tqdm

from sam_backend.commands.evalsets import EvalObject, EvaluateError, by_category
from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.brush import decode_brush
from sam_backend.labelstudio.context import keypoint_result
from sam_backend.segment.engines import Adaptable, Engine
from sam_backend.segment.engines import paths_of as engine_paths
from sam_backend.segment.prompts import PromptError
from sam_backend.segment.simulator import first_click, iou, mean_iou_curve, next_click, noc

log = logging.getLogger(__name__)

LABEL = "Object"
CONFIG = f"""<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="{LABEL}"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="{LABEL}"/></KeyPointLabels>
<RectangleLabels name="box" toName="image" smart="true"><Label value="{LABEL}"/></RectangleLabels></View>"""


@dataclass
class Configuration:
    """One way of answering: an engine (None with --backend), refinement and logits feedback on or off, and the
    protocol. `plain` is the model alone (no refinement), as upstream `SamPredictor` with the previous logits."""

    name: str
    engine: Engine | None  # None with --backend
    refine: bool = True
    logit_feedback: bool = True
    protocol: str = "clicks"


@dataclass
class ObjectRun:
    ious: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    refused: int = 0  # prompts answered 422 (the previous mask stayed)


Pairs = list[tuple[EvalObject, ObjectRun]]  # each measured object with its run, in order
REFUSED = object()  # what an asker returns for a prompt refused with 422


# -- one configuration --------------------------------------------------------------------------------------

def _rectangle(mask: np.ndarray) -> dict[str, Any]:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return {"original_width": w, "original_height": h, "type": "rectanglelabels", "from_name": "box",
            "to_name": "image", "value": {"x": x1 / w * 100, "y": y1 / h * 100, "width": (x2 - x1) / w * 100,
                                          "height": (y2 - y1) / h * 100, "rotation": 0, "rectanglelabels": [LABEL]}}


def _answer_mask(answer: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    regions = answer["results"][0]["result"] if answer.get("results") else []
    mask = np.zeros(shape, bool)
    for region in regions:
        m = decode_brush(region["value"]["rle"], region["original_width"], region["original_height"])
        if m.shape != shape:
            m = cv2.resize(m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        mask |= m
    return mask


def run_object(ask: Callable[[dict[str, Any]], Any], obj: EvalObject, task_id: int, protocol: str,
               max_clicks: int) -> ObjectRun:
    """IoU after each interaction of the simulator on one object; `ask(body)` is one `/predict` (its answer, or
    `REFUSED` for a 422: the previous mask stays, as it would on the annotator's screen, and is counted)."""
    h, w = obj.mask.shape
    run, clicks = ObjectRun(), []
    prediction = np.zeros((h, w), bool)
    for k in range(max_clicks):
        if k == 0 and protocol == "box":
            result = [_rectangle(obj.mask)]
        else:
            click = first_click(obj.mask) if k == 0 else next_click(prediction, obj.mask, obj.ignore)
            if click is None:
                break  # perfect: the curve keeps its last value
            clicks.append(click)
            result = [keypoint_result(x, y, (w, h), positive, LABEL) for x, y, positive in clicks]
        body = {"tasks": [{"id": task_id, "data": {"image": obj.image}}], "label_config": CONFIG,
                "project": "evaluate", "params": {"context": {"result": result}}}
        t0 = time.perf_counter()
        answer = ask(body)
        run.seconds.append(time.perf_counter() - t0)
        if answer is REFUSED:
            run.refused += 1
        else:
            prediction = _answer_mask(answer, (h, w))
        run.ious.append(iou(prediction, obj.mask, obj.ignore))
    return run


def in_process_backend(settings: Settings, config: Configuration, shared: dict[str, Any]) -> Any:
    """A `SamBackend` in this process for `config`; backends of one engine share embeddings and images."""
    from sam_backend.serving.backend import SamBackend
    from sam_backend.serving.cache import EmbeddingCache
    from sam_backend.serving.memory import LOGITS_BYTES, ImageMemory, Memory, ObjectMemory

    engine = config.engine
    cache = shared.setdefault("cache", EmbeddingCache(settings.cache_mb * 1024 * 1024))
    objects = ObjectMemory(max_bytes=LOGITS_BYTES if config.logit_feedback else 0,
                           box_ttl_s=settings.object_memory_ttl_s)
    memory = Memory(images=shared.setdefault("images", ImageMemory()), objects=objects)
    return SamBackend(replace(settings, refine=replace(settings.refine, enabled=config.refine), adapt=False),
                      engine_factory=lambda: engine, cache=cache, memory=memory)


def in_process_asker(settings: Settings, config: Configuration, shared: dict[str, Any]) -> Callable:
    """`/predict` through a `SamBackend` in this process; backends of one engine share embeddings and images."""
    backend = in_process_backend(settings, config, shared)

    def ask(body: dict[str, Any]) -> Any:
        try:
            return backend.predict(body)
        except PromptError as exc:  # the server answers these 422 too
            log.debug("refused: %s", exc)
            return REFUSED
        except ClientError as exc:
            if exc.status == 422:  # refused, or the model found nothing
                log.debug("refused: %s", exc.message)
                return REFUSED
            raise EvaluateError(f"{body['tasks'][0]['data']['image']}: {exc.message}") from None

    return ask


def http_asker(url: str, settings: Settings, timeout_s: float = 600.0) -> Callable:
    """`/predict` against a running backend; waits through 'still encoding' answers."""
    session = requests.Session()
    if settings.basic_auth_user:
        session.auth = (settings.basic_auth_user, settings.basic_auth_pass or "")

    def ask(body: dict[str, Any]) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            r = session.post(url.rstrip("/") + "/predict", json=body, timeout=timeout_s)
            if r.status_code == 200:
                return r.json()
            if r.status_code == 422:  # refused (the message says why), or the model found nothing
                log.debug("refused: %s", r.text[:300])
                return REFUSED
            if r.status_code == 503 and "still encoding" in r.text and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise EvaluateError(f"{url}/predict answered HTTP {r.status_code}: {r.text[:300]}")

    return ask


# -- summary, CSV and plot ----------------------------------------------------------------------------------

def summarize(runs: list[ObjectRun], max_clicks: int, protocol: str) -> dict[str, Any]:
    curves = [r.ious for r in runs]
    n85 = [noc(c, 0.85, max_clicks) for c in curves]
    n90 = [noc(c, 0.90, max_clicks) for c in curves]
    later = [s for r in runs for s in r.seconds[1:]] or [s for r in runs for s in r.seconds]
    return {
        "objects": len(runs), "protocol": protocol,
        "noc85": round(float(np.mean([k for k, _ in n85])), 3), "noc90": round(float(np.mean([k for k, _ in n90])), 3),
        "failures85": sum(not ok for _, ok in n85), "failures90": sum(not ok for _, ok in n90),
        "miou": [round(v, 4) for v in mean_iou_curve(curves, max_clicks)],
        "box_iou": round(float(np.mean([c[0] for c in curves])), 4) if protocol == "box" else None,
        "refused": sum(r.refused for r in runs),
        "seconds_per_click": round(statistics.median(later), 4) if later else None,
        "seconds_first_click": round(float(np.mean([r.seconds[0] for r in runs])), 3),
    }


def write_outputs(out: Path, results: dict[str, tuple[dict, Pairs]], max_clicks: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({name: s for name, (s, _) in results.items()}, indent=1))
    with open(out / "per_object.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["configuration", "object", "image", "category", "noc85", "noc90",
                         *[f"iou@{k}" for k in range(1, max_clicks + 1)]])
        for name, (_, pairs) in results.items():
            for obj, run in pairs:
                curve = mean_iou_curve([run.ious], max_clicks)
                writer.writerow([name, obj.name, obj.image, obj.category, noc(run.ious, 0.85, max_clicks)[0],
                                 noc(run.ious, 0.90, max_clicks)[0], *[f"{v:.4f}" for v in curve]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, (summary, _) in results.items():
        plain = "/plain" in name  # dashed, so a plain curve on top of the product's stays visible
        adapted = "/adapted" in name  # dotted with squares: the same model after learning
        ax.plot(range(1, len(summary["miou"]) + 1), summary["miou"], marker="s" if adapted else "x" if plain else "o",
                markersize=3, linestyle=":" if adapted else "--" if plain else "-",
                label=f"{name} (NoC@90 {summary['noc90']:.2f})")
    ax.set_xlabel("interactions (clicks; with the box protocol the box is the first)")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.set_xlim(1, max_clicks)
    ax.grid(alpha=0.3)
    objects = max(summary["objects"] for summary, _ in results.values())
    ax.set_title(f"mIoU vs clicks on {objects} objects")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "miou_vs_clicks.png")
    plt.close(fig)


def category_groups(objects: list[EvalObject], k: int) -> list[tuple[str, list[EvalObject], list[EvalObject]]]:
    """`(category, its first k objects, the rest)` per category, in order of first appearance; a category with no
    more than k objects has nothing to measure and is left out."""
    return [(name, objs[:k], objs[k:]) for name, objs in by_category(objects).items() if len(objs) > k]


@dataclass
class Adaptation:
    """One category's learning: the engine its rest is measured with (adapted, or the base where refused)."""

    category: str
    engine: Engine
    record: dict[str, Any]


def adapt_group(settings: Settings, config: Configuration, shared: dict[str, Any], category: str,
                accepted: list[EvalObject], adapt_config: Any) -> Adaptation:
    """Learn from `accepted` as the backend does (`segment.adapt.split_held_out`, `adapt`): embeddings through the
    shared cache, the version kept unless it does worse on its held-out objects. The record's `seconds` and
    `rss_growth_mb` are the training's and judging's alone (the embeddings exist before, as in the backend)."""
    from sam_backend.commands.rss import PeakRss
    from sam_backend.segment.adapt import Example, adapt, adapted_decoder, split_held_out, training_steps

    engine = config.engine
    backend = in_process_backend(settings, config, shared)
    examples = []
    for obj in accepted:
        _, embedding, _ = backend.embedding(obj.image, engine)
        examples.append(Example(embedding, obj.mask, obj.ignore, obj.name))
    train, held = split_held_out(examples)
    with PeakRss() as peak:
        outcome = adapt(engine, train, held, replace(adapt_config, steps=training_steps(len(train),
                                                                                           adapt_config.steps)))
    record = {"accepted": outcome.accepted, "trained_on": len(train), "held_out": len(held),
              "held_out_base": outcome.base.to_json() if outcome.base else None,
              "held_out_adapted": outcome.adapted.to_json() if outcome.adapted else None,
              "seconds": round(outcome.seconds, 2), "steps": outcome.steps, "rss_growth_mb": round(peak.growth_mb)}
    log.info("%s: learnt from %d objects in %.1f s, %s", category, len(train), outcome.seconds,
             "kept" if outcome.accepted else "refused (worse on its held-out objects)")
    adapted = engine.with_mask_decoder(adapted_decoder(engine, outcome.state), category) if outcome.accepted else engine
    return Adaptation(category, adapted, record)


def adapt_ks(adapt_on: int | Sequence[int] | None) -> list[int]:
    """The K values of `--adapt-on` (one or several), ascending, each once."""
    if adapt_on is None:
        return []
    return sorted({adapt_on} if isinstance(adapt_on, int) else set(adapt_on))


def evaluate(objects: list[EvalObject], configs: list[Configuration], settings: Settings, out: Path,
             max_clicks: int = 20, backend_url: str | None = None, progress: bool = True,
             adapt_on: int | Sequence[int] | None = None, adapt_config: Any = None) -> dict[str, Any]:
    """Run every configuration on every object; write summary.json, per_object.csv, miou_vs_clicks.png. With
    `adapt_on` (see the module docstring) every configuration also runs adapted on the objects after each category's
    first K: `<name>/adapted` for one K, `<name>/adapted@K` for each of several (then adaptation_curve.csv too);
    each adapted entry's `adaptation.base` is the base model on the same objects."""
    ks = adapt_ks(adapt_on)
    plans: dict[int, list] = {}
    if ks:
        if backend_url or any(not isinstance(c.engine, Adaptable) for c in configs):
            raise EvaluateError("--adapt-on needs a SAM engine in this process (SAM_ENGINE=sam; not --backend, "
                                "SAM 2.1 or GrabCut): it fine-tunes SAM's mask decoder")
        for k in ks:
            groups = category_groups(objects, k)
            if groups:
                plans[k] = groups
            else:
                log.warning("--adapt-on %d: no category has more than %d objects, so nothing is left to measure "
                            "after learning: K = %d is left out", k, k, k)
        if not plans:
            raise EvaluateError(f"--adapt-on {','.join(map(str, ks))}: no category has more than {ks[0]} objects, "
                                "so nothing is left to measure after learning")
        objects = [obj for _, _, rest in plans[min(plans)] for obj in rest]  # every K's rest is among these
    results: dict[str, tuple[dict, Pairs]] = {}
    shared: dict[str, dict[str, Any]] = {}
    adaptations: dict[str, list[Adaptation]] = {}  # per engine and K: clicks and box configurations learn once
    adapted_objects = sum(len(rest) for groups in plans.values() for _, _, rest in groups)
    bar = tqdm(total=(len(objects) + adapted_objects) * len(configs), unit="object", desc="evaluate",
               disable=not progress)
    try:
        for config in configs:
            if backend_url:
                ask = http_asker(backend_url, settings)
            else:
                ask = in_process_asker(settings, config, shared.setdefault(config.engine.engine_id, {}))
            pairs = []
            for i, obj in enumerate(objects):
                pairs.append((obj, run_object(ask, obj, i + 1, config.protocol, max_clicks)))
                bar.update(1)
            results[config.name] = (dict(summarize([r for _, r in pairs], max_clicks, config.protocol),
                                         **paths_of(config.engine)), pairs)
            for k, groups in plans.items():
                name = f"{config.name}/adapted" + ("" if len(ks) == 1 else f"@{k}")
                results[name] = _run_adapted(config, k, groups, settings, shared, adaptations, adapt_config,
                                             max_clicks, bar, {id(o): r for o, r in pairs})
    finally:
        bar.close()
    write_outputs(out, results, max_clicks)
    if len(ks) > 1:
        write_curve(out / "adaptation_curve.csv", results)
    return {name: s for name, (s, _) in results.items()}


def paths_of(engine: Engine | None) -> dict[str, str]:
    """The encoder and decoder paths an in-process engine ran (one for the whole run: `make_engine` waited for the
    encoder's measurement); nothing for a backend asked over HTTP."""
    if engine is None:
        return {}
    encoder, decoder = engine_paths(engine)
    return {"encoder": encoder, "decoder": decoder}


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures a learning curve compares: NoC@85/90, failures, mIoU after 1, 3 and 5 interactions."""
    miou = summary["miou"]
    return {"objects": summary["objects"], "noc85": summary["noc85"], "noc90": summary["noc90"],
            "failures85": summary["failures85"], "failures90": summary["failures90"],
            "miou1": miou[0] if miou else None, "miou3": miou[2] if len(miou) > 2 else None,
            "miou5": miou[4] if len(miou) > 4 else None}


def _run_adapted(config: Configuration, k: int, groups: list, settings: Settings, shared: dict[str, dict[str, Any]],
                 adaptations: dict[str, list[Adaptation]], adapt_config: Any, max_clicks: int, bar: Any,
                 base_runs: dict[int, ObjectRun]) -> tuple[dict, Pairs]:
    """Each group's rest, measured with the group's adapted engine (learnt once per engine and K); `base_runs` (by
    `id` of the object) give the base model's figures on the same objects."""
    import resource

    from sam_backend.segment.adapt import AdaptConfig

    engine_shared = shared.setdefault(config.engine.engine_id, {})
    key = f"{config.engine.engine_id}{'' if config.refine else '/plain'}@{k}"
    if key not in adaptations:
        adaptations[key] = []
        for category, accepted, _ in groups:
            bar.set_postfix_str(f"learning {category} (K={k})")
            adaptations[key].append(adapt_group(settings, config, engine_shared, category, accepted,
                                                adapt_config or AdaptConfig()))
        bar.set_postfix_str("")
    pairs: Pairs = []
    index = 0
    answers = Counter(adapted=0, released=0)  # which decoder answered this configuration's adapted clicks
    for adaptation, (_, _, rest) in zip(adaptations[key], groups, strict=True):
        ask = in_process_asker(settings, replace(config, engine=adaptation.engine), engine_shared)
        counts = (adaptation.engine.answers if isinstance(adaptation.engine, Adaptable) else None) or Counter()
        answers.subtract(counts)  # an engine's counts span every configuration measured with it: this one's part
        for obj in rest:
            index += 1
            pairs.append((obj, run_object(ask, obj, index, config.protocol, max_clicks)))
            bar.update(1)
        answers.update(counts)
    summary = summarize([r for _, r in pairs], max_clicks, config.protocol)
    base = _brief(summarize([base_runs[id(o)] for o, _ in pairs], max_clicks, config.protocol))
    records = {a.category: a.record for a in adaptations[key]}
    trained = sum(r["trained_on"] + r["held_out"] for r in records.values())
    seconds = sum(r["seconds"] for r in records.values())
    summary["adaptation"] = {
        "k": k, "groups": len(records), "kept": sum(r["accepted"] for r in records.values()),
        "refused": sum(not r["accepted"] for r in records.values()), "seconds": round(seconds, 1),
        "seconds_per_accepted_mask": round(seconds / max(1, trained), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_rss_growth_mb": max((r["rss_growth_mb"] for r in records.values()), default=0),
        "base": base, "adapted": _brief(summary),
        "noc90_ratio": round(summary["noc90"] / base["noc90"], 3) if base["noc90"] else None,
        "clicks": dict(answers), "per_group": records}
    return summary, pairs


CURVE_FIGURES = ("noc85", "noc90", "failures90", "miou1", "miou3", "miou5")  # of `_brief`, base and adapted each
CURVE_FIELDS = ["configuration", "k", "groups", "kept", "objects", "noc90_ratio",
                *[f"{side}_{figure}" for figure in CURVE_FIGURES for side in ("base", "adapted")],
                "seconds_per_accepted_mask", "peak_rss_growth_mb"]


def write_curve(path: Path, results: dict[str, tuple[dict, Pairs]]) -> None:
    """One row per adapted configuration and K: base against adapted on the same objects, and what learning cost."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CURVE_FIELDS, extrasaction="ignore")  # a row offers every figure; these are kept
        writer.writeheader()
        for name, (summary, _) in results.items():
            a = summary.get("adaptation")
            if not a:
                continue
            sides = {f"{side}_{figure}": value for side in ("base", "adapted") for figure, value in a[side].items()}
            writer.writerow({**a, **sides, "configuration": name, "objects": summary["objects"]})
