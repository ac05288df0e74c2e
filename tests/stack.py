"""Run `sam-backend up` as a subprocess for tests, and talk to the Label Studio it started."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from sam_backend.labelstudio.client import LabelStudioClient
from sam_backend.labelstudio.process import label_studio_bin


def start_up(state: Path, ls_port: int, port: int, timeout_s: float = 240, engine_env: dict[str, str] | None = None
             ) -> tuple[subprocess.Popen, str]:
    """Start `sam-backend up` with the GrabCut engine (or the engine `engine_env` names); return the process and
    what it printed until ready."""
    env = dict(os.environ, **(engine_env or {"SAM_ENGINE": "grabcut"}), PYTHONUNBUFFERED="1")
    if label_studio_bin():
        env["LABEL_STUDIO_BIN"] = label_studio_bin()
    proc = subprocess.Popen([sys.executable, "-m", "sam_backend", "up", "--state", str(state), "--ls-port",
                             str(ls_port), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                raise AssertionError("up exited:\n" + "".join(seen)) from None
            continue
        seen.append(line)
        if line.startswith("Engine:"):
            return proc, "".join(seen)
    proc.kill()
    raise AssertionError("up did not get ready:\n" + "".join(seen))


def client_for(state: Path, ls_port: int) -> tuple[LabelStudioClient, dict]:
    """An API client for the Label Studio that `up` started, with the credentials it saved."""
    creds = json.loads((state / "credentials.json").read_text())
    return LabelStudioClient(f"http://127.0.0.1:{ls_port}", creds["pat"]), creds
