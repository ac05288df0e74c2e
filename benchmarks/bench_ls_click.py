"""A click through the real Label Studio 1.23.2: cached image, switching tasks, first click after opening.

Starts Label Studio (subprocess, 127.0.0.1, temporary data dir, stopped at the end) and the backend (the
real Flask app on a threaded server on 127.0.0.1, random weights: timing does not depend on them), makes a
project from label_config/points-and-boxes-brush.xml with 1024 × 768 images, registers the backend as
interactive, and posts clicks as the labeling UI does (`POST /api/ml/{id}/interactive-annotating`).

Prints one JSON object (seconds, medians):
- `cached_click_ls_s`: a click on a cached image through Label Studio (≥ 15 clicks);
- `cached_click_direct_s`: the same click posted to the backend's `/predict`; `ls_share_s` is the difference;
- `switch_click_ls_s`: clicks alternating between two cached tasks;
- `first_click_after_open_s`: a task opened (Label Studio's `/predict` without context), then a click right
  away (it waits for the rest of the encode); `first_click_after_precompute_s`: the same once the background
  encode is done; `encode_s`: the encoder alone on that image, for comparison;
- `stages_ms`: the backend's `Server-Timing` stages of the last direct click; `decoder`, the decoder path;
- the CPU model and flags.
Target (issue "click in under 100 ms"): `cached_click_ls_s` ≤ 0.1 for ViT-B and Hiera-T on a 2-core CPU.

With real weights and photos (`--checkpoint FILE --photos DIR`, SAM engine: MobileSAM, ViT-B/L/H) the backend runs
as its own process (`sam-backend serve`, the configured SAM_ENCODER / SAM_DECODER, SAM_PREFETCH_NEXT=1), as in
production, and the figures are the ones a client of Label Studio sees (medians):
- `ready_s`: process start → `/health` says the model is ready, graphs as cached beside the checkpoint
  (`ready_first_s`: the first start of this run, which may have exported them; the bench restarts the backend
  once the background encoder measurement is done and times the restart);
- `restart_torch_first` / `restart_torch_free`: two more restarts side by side, `SAM_QUICK_START=false` (torch and
  the weights loaded before the first click) and the torch-free start (the cached ONNX graphs serve while torch
  loads): `ready_s`, `first_click_s` (process start → a click on a never-seen photo, posted as soon as it is ready,
  answered), `full_model_s` (→ the full engine serves) and the stage that answered;
- `never_seen_click_ls_s`: a click on a photo the backend has never seen (fetch, encode, decode);
- `cached_click_ls_s`, `cached_box_ls_s`, `switch_click_ls_s`, `click_after_open_ls_s`: as above on photos;
- `cached_click_while_encoding_ls_s`: clicks on a cached photo while another photo encodes;
- `adapted_click_ls_s` / `adapted_click_direct_s` / `adapted_stages_ms`: the same cached photo in a second project that
  learns from the team (`SAM_ADAPT=true` on the restarted backend; a version of its decoder is put in the sidecar
  before the restart), its clicks alternating with the first project's released-decoder clicks;
- `next_task_click_ls_s` / `next_task_hits`: the annotator opens a task, works `--pace` seconds (10), then clicks on
  the next task, never opened: with SAM_PREFETCH_NEXT its image is already encoded (the sidecar says hit or not);
  `next_task_click_direct_s`: the same first click on a next task posted to the backend itself;
- `ls_share_s` (a click through Label Studio minus the same click posted to the backend), `ls_floor_s` (a click
  through Label Studio to a stand-in backend that answers a stored result at once: what Label Studio alone costs),
  `stages_ms`, `encoder`, `decoder`, `peak_rss_mb` (the backend process's VmHWM), the CPU.

    .venv/bin/python benchmarks/bench_ls_click.py --checkpoint checkpoints/mobile_sam.pt \
        --photos ../shared/evaldata/GrabCut/data_GT

    .venv/bin/python benchmarks/bench_ls_click.py --engine sam --model-type vit_b
    .venv/bin/python benchmarks/bench_ls_click.py --engine sam2 --model-type sam2.1_hiera_tiny
    SAM_DECODER=eager .venv/bin/python benchmarks/bench_ls_click.py   # the eager decoder, for a before/after
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from PIL import Image
from werkzeug.serving import make_server

from sam_backend.commands.bench import cpu_info
from sam_backend.config import Settings
from sam_backend.labelstudio.client import free_port
from sam_backend.labelstudio.context import keypoint_result
from sam_backend.labelstudio.process import LabelStudio, stop_process
from sam_backend.segment.samples import bench_image
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = "points-and-boxes-brush.xml"
W, H = 1024, 768


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(bench_image(W, H, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


def keypoint(x: float, y: float) -> dict:
    """A smart keypoint as the labeling UI serializes it: the context's keypoint plus the UI's own fields."""
    result = keypoint_result(x, y, (W, H))
    result["value"]["labels"] = ["Object"]
    return {**result, "image_rotation": 0, "id": f"k{int(x)}_{int(y)}", "origin": "manual"}


def engine_for(kind: str, model_type: str):  # noqa: ANN201 - an Engine
    from sam_backend.segment.engines.sam import SamEngine
    from sam_backend.segment.engines.sam2 import Sam2Engine

    settings = Settings.from_env()
    engine = (Sam2Engine if kind == "sam2" else SamEngine).random(model_type, device=settings.device,
                                                                   precision=settings.precision)
    engine.use_decoder(settings.decoder)
    return engine


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["sam", "sam2"], default="sam")
    parser.add_argument("--model-type", default=None, help="vit_b (sam) or sam2.1_hiera_tiny (sam2) by default")
    parser.add_argument("--clicks", type=int, default=15)
    parser.add_argument("--opens", type=int, default=3, help="tasks opened for the first-click figures")
    parser.add_argument("--checkpoint", type=Path, default=None, help="real SAM weights (MobileSAM: mobile_sam.pt)")
    parser.add_argument("--photos", type=Path, default=None, help="a folder of photos (.jpg, .png, .bmp)")
    parser.add_argument("--pace", type=float, default=10.0, help="seconds an annotator works on a task")
    args = parser.parse_args()
    if (args.checkpoint is None) != (args.photos is None):
        parser.error("--checkpoint and --photos go together")
    if args.checkpoint is not None:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(real_bench(args)))
        return
    logging.basicConfig(level=logging.WARNING)
    model_type = args.model_type or ("vit_b" if args.engine == "sam" else "sam2.1_hiera_tiny")
    engine = engine_for(args.engine, model_type)
    config = (ROOT / "label_config" / CONFIG_FILE).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        ls = LabelStudio(Path(tmp) / "ls", "bench@example.com", "bench-Passw0rd-1").start()
        server = None
        try:
            settings = Settings.from_env({**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat,
                                          "SAM_METADATA_DB": str(Path(tmp) / "sidecar.db")})
            backend = SamBackend(settings, engine_factory=lambda: engine)
            port = free_port()
            server = make_server("127.0.0.1", port, create_app(settings, backend=backend), threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{port}"
            project = ls.create_project("bench", config)
            tasks = ls.upload(project, {f"img{i}.png": png(i) for i in range(2 + 2 * args.opens)})
            ml = ls.add_ml_backend(project, url)
            x, y = W / 3, H / 2
            click = [keypoint(x, y)]

            def through_ls(task: int) -> None:
                answer = ls.interactive(ml, task, click)
                if "errors" in answer or not answer.get("data", {}).get("result"):
                    raise RuntimeError(f"click through Label Studio failed: {json.dumps(answer)[:300]}")

            for task in tasks[:2]:  # encode both, and warm every path
                through_ls(task)
                through_ls(task)
            cached_ls = [timed(lambda: through_ls(tasks[0])) for _ in range(args.clicks)]
            switch = [timed(lambda i=i: through_ls(tasks[i % 2])) for i in range(args.clicks)]

            body = {"tasks": [ls.task(tasks[0])], "label_config": config, "project": f"{project}.0",
                    "params": {"context": {"result": click}}}
            direct: list[float] = []
            stages: dict[str, float] = {}
            with requests.Session() as http:
                for _ in range(args.clicks):
                    t0 = time.perf_counter()
                    resp = http.post(url + "/predict", json=body, timeout=60)
                    direct.append(time.perf_counter() - t0)
                    resp.raise_for_status()
                    stages = {k: float(v) for k, v in (p.split(";dur=") for p in
                                                       resp.headers["Server-Timing"].split(", "))}
                first_open, first_pre = [], []
                for i, task in enumerate(tasks[2:]):
                    opened = {"tasks": [ls.task(task)], "label_config": config, "project": f"{project}.0",
                              "params": {"context": None}}
                    http.post(url + "/predict", json=opened, timeout=10).raise_for_status()
                    if i % 2:  # the annotator looks a while: the background encode is done before the click
                        if not backend.prewarm.wait(600):
                            raise RuntimeError("the background encode did not finish")
                        first_pre.append(timed(lambda task=task: through_ls(task)))
                    else:  # the annotator clicks at once: the click waits for the rest of the encode
                        first_open.append(timed(lambda task=task: through_ls(task)))
                image = bench_image(W, H, seed=99)
                encodes = [timed(lambda: engine.embed(image)) for _ in range(2)]
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
            ls.stop()
    med = statistics.median
    print(json.dumps({
        "engine": args.engine, "model": model_type, "decoder": engine.decoder_kind, "precision": engine.precision,
        **cpu_info(), "image": [W, H], "clicks": args.clicks,
        "cached_click_ls_s": round(med(cached_ls), 4),
        "cached_click_direct_s": round(med(direct), 4),
        "ls_share_s": round(med(cached_ls) - med(direct), 4),
        "switch_click_ls_s": round(med(switch), 4),
        "first_click_after_open_s": round(med(first_open), 3),
        "first_click_after_precompute_s": round(med(first_pre), 4),
        "encode_s": round(med(encodes), 3),
        "stages_ms": stages,
    }))


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class ServerProcess:
    """`sam-backend serve` on 127.0.0.1 as a child process, its output in `log`."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.t0 = time.monotonic()
        self.log = log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sam_backend", "serve", "--port", str(self.port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def health(self) -> dict:
        try:
            return requests.get(self.url + "/health", timeout=2).json()
        except (requests.RequestException, ValueError):
            return {}

    def wait_ready(self, timeout_s: float = 600) -> float:
        """Seconds from the process start until `/health` says the model is ready."""
        while time.monotonic() - self.t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the backend exited with {self.proc.returncode}; see {self.log.name}")
            state = self.health()
            if state.get("engine_ready"):
                return time.monotonic() - self.t0
            if state.get("model") == "failed":
                raise RuntimeError(f"the model failed to load: {state.get('engine_error')}")
            time.sleep(0.05)
        raise RuntimeError("the model was not ready in time")

    def wait_until(self, pred, timeout_s: float = 600) -> None:  # noqa: ANN001 - health dict → bool
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred(self.health()):
                return
            time.sleep(0.2)
        raise RuntimeError("the backend did not reach the expected state in time")

    def peak_rss_mb(self) -> float | None:
        """The largest VmHWM of the server and its worker processes (gunicorn serves from a child)."""
        pids, peak = [self.proc.pid], None
        with contextlib.suppress(OSError):
            pids += [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        mb = round(int(line.split()[1]) / 1024, 1)
                        peak = mb if peak is None else max(peak, mb)
            except OSError:
                continue
        return peak

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def restart_figures(server: ServerProcess, ls: LabelStudio, task: int, config: str, project: int,
                    size: tuple[int, int]) -> dict:
    """Seconds from the process start until `/health` says ready (`ready_s`), until a click on `task`'s never-seen
    photo, posted to `/predict` as soon as it is ready, is answered (`first_click_s`), and until the full torch
    engine serves (`full_model_s`); the stage that answered the click."""
    ready = server.wait_ready()
    body = {"tasks": [ls.task(task)], "label_config": config, "project": f"{project}.0",
            "params": {"context": {"result": [percent_keypoint(50, 50, size)]}}}
    stage = server.health().get("model_stage")
    requests.post(server.url + "/predict", json=body, timeout=120).raise_for_status()
    first = time.monotonic() - server.t0
    server.wait_until(lambda h: h.get("model_stage") == "full", timeout_s=600)
    return {"ready_s": round(ready, 2), "first_click_s": round(first, 2), "click_stage": stage,
            "full_model_s": round(time.monotonic() - server.t0, 2)}


def rect(x: float, y: float, w: float, h: float) -> dict:
    """A smart rectangle as the labeling UI sends it (percent of the image)."""
    return {"original_width": 100, "original_height": 100, "image_rotation": 0, "id": "r1", "from_name": "box",
            "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["Object"]}}


def percent_keypoint(x: float, y: float, size: tuple[int, int]) -> dict:
    result = keypoint_result(x * size[0] / 100, y * size[1] / 100, size)
    result["value"]["labels"] = ["Object"]
    return {**result, "image_rotation": 0, "id": "k1", "origin": "manual"}


def ls_floor(ls: LabelStudio, project: int, task: int, result: list[dict], body: dict, backend: str,
             clicks: int) -> float:
    """Median seconds of a click through Label Studio to a stand-in backend that answers, at once, the answer the
    real backend gave to the same click (Label Studio's own cost: its API, serializing the task, the JSON both
    ways)."""
    from flask import Flask, jsonify

    canned = requests.post(backend + "/predict", json=body, timeout=60).json()
    app = Flask("ls-floor")
    app.add_url_rule("/health", "health", lambda: jsonify({"status": "UP", "model_class": "stand-in"}))
    app.add_url_rule("/setup", "setup", lambda: jsonify({"model_version": "stand-in"}), methods=["POST"])
    app.add_url_rule("/predict", "predict", lambda: jsonify(canned), methods=["POST"])
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ml = ls.add_ml_backend(project, f"http://127.0.0.1:{port}")
        ls.interactive(ml, task, result)
        times = [timed(lambda: ls.interactive(ml, task, result)) for _ in range(clicks)]
    finally:
        server.shutdown()
        server.server_close()
    return statistics.median(times)


def publish_version(env: dict[str, str], db: Path, project: int, locks: Path) -> None:
    """A version of the mask decoder for `project` in the sidecar `db`, learnt on the weights the server loads (the
    released decoder's heads, nudged: the arithmetic of a learnt one, whatever its masks)."""
    import torch

    from sam_backend.segment import adapt
    from sam_backend.segment.engines.sam import SamEngine
    from sam_backend.serving.adapt_versions import weights_of
    from sam_backend.sidecar.learning import LearningStore
    from sam_backend.sidecar.store import open_sidecar

    engine = SamEngine.from_settings(Settings.from_env({**env, "SAM_ENCODER": "eager"}))
    decoder = adapt.adapted_decoder(engine)
    torch.manual_seed(0)
    with torch.no_grad():
        state = {n: p + 1e-3 * torch.randn_like(p) for n, p in decoder.named_parameters()
                 if n.startswith(adapt.TRAINABLE)}
    data = adapt.pack_version(state, {"weights": weights_of(engine), "project": str(project)})
    LearningStore(open_sidecar(db), locks).publish(str(project), weights_of(engine), data, {"trained_on": 0}, keep=3)


def real_bench(args: argparse.Namespace) -> dict:
    """The figures of the module docstring with real weights and photos (see there)."""
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    need = 8 + 2 * args.opens + 4 * args.opens
    if len(photos) < need:
        raise SystemExit(f"--photos: expected at least {need} photos, found {len(photos)} in {args.photos}")
    photos = photos[:need]
    sizes = {p.name: Image.open(p).size for p in photos}
    config = (ROOT / "label_config" / CONFIG_FILE).read_text()
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        ls = LabelStudio(Path(tmp) / "ls", "bench@example.com", "bench-Passw0rd-1").start()
        server = None
        try:
            project = ls.create_project("bench", config)
            tasks = ls.upload(project, {p.name: p.read_bytes() for p in photos})
            names = {t: ls.task(t)["data"]["image"].rsplit("/", 1)[-1] for t in tasks}
            size_of = {t: next(v for k, v in sizes.items() if names[t].endswith(k)) for t in tasks}
            db = Path(tmp) / "sidecar.db"
            env = {**os.environ, "SAM_ENGINE": "sam", "SAM_CHECKPOINT": str(args.checkpoint.resolve()),
                   "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat, "SAM_METADATA_DB": str(db),
                   "SAM_PREFETCH_NEXT": "1", "SAM_CLICK_DEADLINE_S": "80"}
            env.pop("SAM_MODEL_TYPE", None)
            server = ServerProcess(env, Path(tmp) / "backend.log")
            ready_first = server.wait_ready()
            server.wait_until(lambda h: h.get("encoder") != "measuring", timeout_s=1800)
            server.stop()
            # Restarts timed side by side: with torch imported before the first click (SAM_QUICK_START=false, the
            # start before the torch-free one), then the torch-free start; each answers a click on a photo it has
            # never seen (fetch, encode, decode) as soon as /health says ready.
            started = {}
            for quick, task in (("false", tasks[6]), ("true", tasks[7])):
                server = ServerProcess({**env, "SAM_QUICK_START": quick}, Path(tmp) / "backend.log")
                started[quick] = restart_figures(server, ls, task, config, project, size_of[task])
                server.stop()
            # A second project, learning from the team (SAM_ADAPT), with a version of its decoder in the sidecar: its
            # clicks run the adapted decoder; the first project's, the released one.
            adapted_project = ls.create_project("bench adapted", config)
            [adapted_task] = ls.upload(adapted_project, {photos[0].name: photos[0].read_bytes()})
            publish_version(env, db, adapted_project, Path(tmp) / "locks")
            env = {**env, "SAM_ADAPT": "true", "SAM_ADAPTER_DIR": str(Path(tmp) / "locks")}
            server = ServerProcess(env, Path(tmp) / "backend.log")  # the restart: graphs and verdicts cached
            ready = server.wait_ready()
            server.wait_until(lambda h: h.get("model_stage") == "full")  # the rows below: the full engine's paths
            health = server.health()
            ml = ls.add_ml_backend(project, server.url)
            ml_adapted = ls.add_ml_backend(adapted_project, server.url)

            def click(task: int, result: list[dict]) -> float:
                t0 = time.perf_counter()
                answer = ls.interactive(ml, task, result)
                took = time.perf_counter() - t0
                if "errors" in answer or not answer.get("data", {}).get("result"):
                    raise RuntimeError(f"click through Label Studio failed: {json.dumps(answer)[:300]}")
                return took

            def point(task: int) -> list[dict]:
                return [percent_keypoint(50, 50, size_of[task])]

            size_of[adapted_task] = size_of[tasks[0]]
            adapted = []  # a cached click of the adapted project, alternating with the base project's
            for _ in range(args.clicks):
                click(tasks[0], point(tasks[0]))
                t0 = time.perf_counter()
                answer = ls.interactive(ml_adapted, adapted_task, point(adapted_task))
                adapted.append(time.perf_counter() - t0)
                if "-adapted-" not in answer.get("data", {}).get("model_version", ""):
                    raise RuntimeError(f"the adapted project's click was not adapted: {json.dumps(answer)[:300]}")
            box = [rect(25, 25, 50, 50)]
            fresh = iter(tasks[6:])
            never_seen = [click(t, point(t)) for t in tasks[2:6]]
            cached = [click(tasks[0], point(tasks[0])) for _ in range(args.clicks)]
            click(tasks[1], point(tasks[1]))
            boxes = [click(tasks[0], box) for _ in range(args.clicks)]
            switch = [click(tasks[i % 2], point(tasks[i % 2])) for i in range(args.clicks)]
            body = {"tasks": [ls.task(tasks[0])], "label_config": config, "project": f"{project}.0",
                    "params": {"context": {"result": point(tasks[0])}}}
            direct, stages, adapted_direct, adapted_stages = [], {}, [], {}
            adapted_body = {"tasks": [ls.task(adapted_task)], "label_config": config,
                            "project": f"{adapted_project}.0", "params": {"context": {"result": point(adapted_task)}}}
            with requests.Session() as http:
                for _ in range(args.clicks):
                    for sent, times, last in ((body, direct, stages), (adapted_body, adapted_direct, adapted_stages)):
                        t0 = time.perf_counter()
                        resp = http.post(server.url + "/predict", json=sent, timeout=60)
                        times.append(time.perf_counter() - t0)
                        resp.raise_for_status()
                        last.update({k: float(v) for k, v in (p.split(";dur=") for p in
                                                              resp.headers["Server-Timing"].split(", "))})

                def open_task(task: int) -> None:
                    opened = {"tasks": [ls.task(task)], "label_config": config, "project": f"{project}.0",
                              "params": {"context": None}}
                    http.post(server.url + "/predict", json=opened, timeout=10).raise_for_status()

                after_open, while_encoding, next_task, next_ids = [], [], [], []
                for _ in range(args.opens):
                    task = next(fresh)
                    open_task(task)  # the click comes at once: it waits for the rest of the encode
                    after_open.append(click(task, point(task)))
                for _ in range(args.opens):
                    task = next(fresh)
                    open_task(task)  # its encode runs; meanwhile clicks on a cached photo
                    t_end = time.perf_counter() + 0.5
                    while time.perf_counter() < t_end:
                        while_encoding.append(click(tasks[0], point(tasks[0])))
                    server.wait_until(lambda h: h.get("precompute_pending") == 0)
                next_direct = []
                for i in range(2 * args.opens):
                    task, following = next(fresh), next(fresh)
                    open_task(task)
                    time.sleep(args.pace)  # the annotator works on the opened task
                    if i % 2 == 0:
                        next_task.append(click(following, point(following)))
                        next_ids.append(following)
                    else:  # the same click posted to the backend: Label Studio's share of a task's first click
                        first = {**body, "tasks": [ls.task(following)],
                                 "params": {"context": {"result": point(following)}}}
                        t0 = time.perf_counter()
                        http.post(server.url + "/predict", json=first, timeout=60).raise_for_status()
                        next_direct.append(time.perf_counter() - t0)
            rss = server.peak_rss_mb()
            floor = ls_floor(ls, project, tasks[0], point(tasks[0]), body, server.url, args.clicks)
            hits = []
            with sqlite3.connect(db) as con:
                for task in next_ids:
                    row = con.execute("SELECT cache_hit FROM interactions WHERE task_id = ? ORDER BY id LIMIT 1",
                                      (task,)).fetchone()
                    hits.append(bool(row and row[0]))
        finally:
            if server is not None:
                server.stop()
            ls.stop()
    return {
        "model": health.get("model_version"), "encoder": health.get("encoder"), "decoder": health.get("decoder"),
        **cpu_info(), "photos": str(args.photos), "clicks": args.clicks,
        "ready_first_s": round(ready_first, 2), "ready_s": round(ready, 2),
        "restart_torch_first": started["false"], "restart_torch_free": started["true"],
        "never_seen_click_ls_s": round(med(never_seen), 3),
        "cached_click_ls_s": round(med(cached), 4), "cached_click_direct_s": round(med(direct), 4),
        "ls_share_s": round(med(cached) - med(direct), 4), "ls_floor_s": round(floor, 4),
        "cached_box_ls_s": round(med(boxes), 4), "switch_click_ls_s": round(med(switch), 4),
        "click_after_open_ls_s": round(med(after_open), 3),
        "cached_click_while_encoding_ls_s": round(med(while_encoding), 4) if while_encoding else None,
        "adapted_click_ls_s": round(med(adapted), 4), "adapted_click_direct_s": round(med(adapted_direct), 4),
        "adapted_stages_ms": adapted_stages,
        "next_task_click_ls_s": round(med(next_task), 4), "next_task_hits": f"{sum(hits)}/{len(hits)}",
        "next_task_click_direct_s": round(med(next_direct), 4),
        "peak_rss_mb": rss, "stages_ms": stages,
    }


if __name__ == "__main__":
    main()
