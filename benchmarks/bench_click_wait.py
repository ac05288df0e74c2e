"""How long a click on a new image waits when background encodes are queued: this tree against a baseline
revision, side by side in one run.

Scenario (SAM ViT-B, random weights, 1024 × 768 images, one backend in-process): three tasks are opened
(C, D, E: their encodes are queued in the background), and while C encodes an annotator clicks on a
fourth image B. Printed: the click's seconds, how many encodes ran before B's, and the encode time;
with `--baseline REV` the same scenario runs on that git revision (a temporary worktree) in a
subprocess, and the ratio is printed.

    .venv/bin/python benchmarks/bench_click_wait.py --baseline ca51c82
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""


def image(seed: int, width: int = 1024, height: int = 768) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(40, 200, size=(height // 32, width // 32, 3)).astype(np.uint8)
    img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    cv2.circle(img, (width // 2, height // 2), height // 5, (230, 120, 30), -1)
    return img


def body(name: str, click: bool) -> dict:
    context = {"result": [{"original_width": 1024, "original_height": 768, "type": "keypointlabels",
                           "from_name": "kp", "to_name": "image", "is_positive": True,
                           "value": {"x": 50, "y": 50, "keypointlabels": ["Object"]}}]} if click else None
    return {"tasks": [{"id": 1, "data": {"image": f"{name}.png"}}], "label_config": CONFIG,
            "params": {"context": context}}


def scenario(model_type: str) -> dict:
    """Run the scenario with whatever `sam_backend` is importable; return its figures."""
    from sam_backend.config import Settings

    try:
        from sam_backend.segment.engines.sam import SamEngine
        from sam_backend.serving.backend import SamBackend
    except ImportError:  # the layout before the wings
        from sam_backend.engines.sam import SamEngine
        from sam_backend.model import SamBackend

    order: list[str] = []
    engine = SamEngine.random(model_type, device="cpu")
    real_embed = engine.embed

    def embed(pixels: np.ndarray):  # noqa: ANN202
        order.append(names[int(pixels[0, 0, 0])])
        return real_embed(pixels)

    engine.embed = embed
    names = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate("BCDE"):
            img = image(i)
            img[0, 0, 0] = 10 + i
            names[10 + i] = name
            cv2.imwrite(str(Path(tmp) / f"{name}.png"), img[:, :, ::-1])
        t0 = time.perf_counter()
        real_embed(image(9))
        encode_s = time.perf_counter() - t0
        settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": tmp, "SAM_METADATA_DB": f"{tmp}/s.db"})
        backend = SamBackend(settings, engine_factory=lambda: engine, recorder=lambda item: None)
        backend.start()
        for name in "CDE":
            backend.predict(body(name, click=False))
        while not order:
            time.sleep(0.01)
        t0 = time.perf_counter()
        backend.predict(body("B", click=True))
        click_s = time.perf_counter() - t0
        waited = order.index("B")
        wait = getattr(getattr(backend, "prewarm", None), "wait", None) or backend.wait_precomputed
        wait(600)
    return {"click_s": round(click_s, 2), "encodes_before_click": waited, "encode_s": round(encode_s, 2),
            "order": "".join(order)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--baseline", default=None, help="git revision to compare with (run in a subprocess)")
    parser.add_argument("--only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only:
        print(json.dumps(scenario(args.model_type)))
        return
    repo = Path(__file__).resolve().parents[1]
    result = {"cpu": _cpu(), "model": args.model_type}
    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), args.baseline],
                           check=True, capture_output=True)
            try:
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--only", "--model-type",
                                      args.model_type], env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree,
                                     check=True, capture_output=True, text=True).stdout
                result["before"] = json.loads(out.strip().splitlines()[-1])
            finally:
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)
    result["after"] = scenario(args.model_type)
    if "before" in result:
        result["click_after_over_before"] = round(result["after"]["click_s"] / result["before"]["click_s"], 2)
    print(json.dumps(result))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
