"""`sam-backend up`: Label Studio + backend, connected, with a demo project; Ctrl-C stops both; a rerun reuses data.

Runs the real command as a subprocess with the GrabCut engine (no checkpoint can be downloaded here,
and SAM_ENGINE=grabcut keeps the command from trying).
"""

from __future__ import annotations

import signal
import socket

import pytest
from stack import client_for, start_up

from sam_backend.labelstudio.client import free_port

pytestmark = pytest.mark.integration


def closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_up_connects_stops_cleanly_and_reuses_data(tmp_path):
    state, ls_port, port = tmp_path / "state", free_port(), free_port()
    proc, out = start_up(state, ls_port, port)
    try:
        ls, creds = client_for(state, ls_port)
        assert creds["password"] in out and f"http://127.0.0.1:{ls_port}/projects/" in out
        assert oct((state / "credentials.json").stat().st_mode & 0o777) == "0o600"
        [project] = [p["id"] for p in ls.projects() if p["title"] == "sam-backend demo"]
        assert len(ls.tasks(project)) == 3  # every sample image became a task
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

    proc, out = start_up(state, ls_port, port)
    try:
        assert creds["password"] not in out and "credentials in" in out
        assert [p["id"] for p in ls.projects() if p["title"] == "sam-backend demo"] == [project]
        assert len(ls.ml_backends(project)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
