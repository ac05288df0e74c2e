"""The API key only ever goes to the Label Studio address the operator configured, never to a `/setup` hostname.

Two real HTTP servers on 127.0.0.1: one plays Label Studio (token refresh + an uploaded image), the
other an attacker who sends a hostile `/setup`. Every request each receives is recorded.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from sam_backend.config import ConfigError, Settings
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend


def _jwt(claims: dict) -> str:
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'HS256'})}.{part(claims)}.c2lnbmF0dXJl"


PAT = _jwt({"token_type": "refresh", "jti": "pat-secret-jti"})
ACCESS = _jwt({"token_type": "access", "exp": time.time() + 3600, "jti": "access-secret-jti"})
buf = io.BytesIO()
Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(buf, format="PNG")
PNG = buf.getvalue()

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""
CLICK = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/x.png"}}], "label_config": CONFIG,
         "params": {"context": {"result": [
             {"original_width": 32, "original_height": 24, "type": "keypointlabels", "from_name": "kp",
              "to_name": "image", "is_positive": True, "value": {"x": 50, "y": 50, "keypointlabels": ["Object"]}}]}}}


class Recorder(BaseHTTPRequestHandler):
    """Records every request (method, path, headers, body); serves the refresh and the image."""

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                 "body": body.decode("latin-1")})
        return body

    def do_GET(self):  # noqa: N802
        self._record()
        self._send(200, PNG)

    def do_POST(self):  # noqa: N802
        self._record()
        self._send(200, json.dumps({"access": ACCESS}).encode())

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def servers():
    started = []
    for _ in range(2):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        httpd.seen = []
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
    yield [(s, f"http://127.0.0.1:{s.server_address[1]}") for s in started]
    for s in started:
        s.shutdown()


def carries_a_secret(request: dict) -> bool:
    text = json.dumps(request)
    return any(secret in text for secret in (PAT, ACCESS, "pat-secret-jti", "access-secret-jti")) or \
        "authorization" in {k.lower() for k in request["headers"]}


def client_for(settings: Settings):
    backend = SamBackend(settings, engine_factory=GrabCutEngine, recorder=lambda item: None)
    return create_app(settings, backend=backend, start=False).test_client()


def test_a_key_without_a_configured_address_is_refused_at_start():
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"LABEL_STUDIO_API_KEY": PAT})
    assert "LABEL_STUDIO_API_KEY" in str(err.value) and "LABEL_STUDIO_URL" in str(err.value)
    assert PAT not in str(err.value)


def test_hostile_setup_gets_no_key_and_no_token(servers, tmp_path):
    (ls, ls_url), (attacker, attacker_url) = servers
    settings = Settings.from_env({"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": PAT,
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    client = client_for(settings)
    assert client.post("/setup", json={"hostname": attacker_url, "schema": CONFIG}).status_code == 200
    resp = client.post("/predict", json=CLICK)
    assert resp.status_code == 200, resp.json
    assert attacker.seen == []
    # The configured Label Studio got the refresh (with the PAT) and the image (with the access token).
    assert [(r["method"], r["path"]) for r in ls.seen] == [("POST", "/api/token/refresh/"),
                                                            ("GET", "/data/upload/1/x.png")]
    assert ls.seen[1]["headers"]["Authorization"] == f"Bearer {ACCESS}"


def test_setup_hostname_never_gets_credentials_even_if_settings_bypass_the_check(servers, tmp_path):
    """Settings built by hand (not `from_env`) with a key and no address: the `/setup` host may serve the
    image (where the operator's SAM_ALLOWED_HOSTS lets the backend reach it: /setup never widens the address
    policy), but no request to it carries the key, the access token or an Authorization header."""
    (_, _), (attacker, attacker_url) = servers
    settings = replace(Settings.from_env({"SAM_METADATA_DB": str(tmp_path / "s.db"), "SAM_ALLOWED_HOSTS": "127.0.0.1"}),
                       label_studio_api_key=PAT)
    client = client_for(settings)
    client.post("/setup", json={"hostname": attacker_url, "schema": CONFIG})
    client.post("/predict", json=CLICK)
    assert attacker.seen, "the /setup host is still used for Label Studio paths without LABEL_STUDIO_URL"
    assert not any(carries_a_secret(r) for r in attacker.seen)


def test_a_setup_hostname_never_widens_the_address_policy(servers, tmp_path):
    """Anyone can call /setup: a loopback hostname it names is not fetched from unless SAM_ALLOWED_HOSTS names it
    (it used to be exempted for the process's life)."""
    (_, _), (attacker, attacker_url) = servers
    client = client_for(Settings.from_env({"SAM_METADATA_DB": str(tmp_path / "s.db")}))
    client.post("/setup", json={"hostname": attacker_url, "schema": CONFIG})
    resp = client.post("/predict", json=CLICK)
    assert resp.status_code == 403 and "loopback" in resp.json["errors"][0]
    assert attacker.seen == []
