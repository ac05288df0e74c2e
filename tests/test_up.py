"""`sam-backend up`: Label Studio + backend, connected, with a demo project; Ctrl-C stops both; a rerun reuses data.

Runs the real command as a subprocess with the GrabCut engine (no checkpoint can be downloaded here,
and SAM_ENGINE=grabcut keeps the command from trying).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from sam_backend.images import LabelStudioAuth
from sam_backend.labelstudio import LabelStudio, free_port, label_studio_bin

pytestmark = pytest.mark.integration


def start_up(state, ls_port, port):
    env = dict(os.environ, SAM_ENGINE="grabcut", PYTHONUNBUFFERED="1")
    if label_studio_bin():
        env["LABEL_STUDIO_BIN"] = label_studio_bin()
    proc = subprocess.Popen([sys.executable, "-m", "sam_backend.cli", "up", "--state", str(state), "--ls-port",
                             str(ls_port), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(seen)
            continue
        seen.append(line)
        if line.startswith("Engine:"):
            return proc, "".join(seen), lines
    proc.kill()
    raise AssertionError("up did not get ready:\n" + "".join(seen))


def closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_up_connects_stops_cleanly_and_reuses_data(tmp_path):
    state, ls_port, port = tmp_path / "state", free_port(), free_port()
    proc, out, _ = start_up(state, ls_port, port)
    try:
        creds = json.loads((state / "credentials.json").read_text())
        assert creds["password"] in out and f"http://127.0.0.1:{ls_port}/projects/" in out
        assert oct((state / "credentials.json").stat().st_mode & 0o777) == "0o600"
        ls = LabelStudio(state / "label-studio", creds["email"], creds["password"], port=ls_port)
        auth = LabelStudioAuth(creds["pat"], requests.Session(), 10)
        ls.api.auth = lambda r: (r.headers.update(auth.header(ls.url)), r)[1]
        [project] = [p["id"] for p in ls.projects() if p["title"] == "sam-backend demo"]
        [ml] = ls.ml_backends(project)
        assert ml["is_interactive"] and ml["url"] == f"http://127.0.0.1:{port}"
        task = ls.tasks(project)[0]
        answer = ls.interactive(ml["id"], task["id"], [{
            "original_width": 800, "original_height": 600, "type": "keypointlabels", "from_name": "kp",
            "to_name": "image", "is_positive": True, "value": {"x": 50, "y": 50, "keypointlabels": ["Object"]}}])
        assert "errors" not in answer and answer["data"]["result"][0]["type"] == "brushlabels"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert closed(ls_port) and closed(port)

    proc, out, _ = start_up(state, ls_port, port)
    try:
        assert creds["password"] not in out and "credentials in" in out
        assert [p["id"] for p in ls.projects() if p["title"] == "sam-backend demo"] == [project]
        assert len(ls.ml_backends(project)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
