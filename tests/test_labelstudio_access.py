"""Label Studio credentials on the wire: refresh failures, one refresh and one retry on 401, credentials
dropped when a redirect leaves Label Studio, the redirect cap. Real HTTP servers on 127.0.0.1 record
every request."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from sam_backend.config import Settings
from sam_backend.labelstudio.auth import LabelStudioError
from sam_backend.labelstudio.images import MAX_REDIRECTS, MAX_RETRIES, ImageError, ImageFetcher


def _jwt(claims: dict) -> str:
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'HS256'})}.{part(claims)}.c2ln"


PAT = _jwt({"token_type": "refresh", "jti": "pat"})
buf = io.BytesIO()
Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(buf, format="PNG")
PNG = buf.getvalue()


class LabelStudioLike(BaseHTTPRequestHandler):
    """`POST /api/token/refresh/` answers `refresh_status` with a new access token each time;
    `/data/upload/revoked.png` refuses the first access token it sees (401), then serves;
    `/data/upload/out.png` redirects to `other`; `/data/upload/loop.png` redirects to itself."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv = self.server
        srv.seen.append(("POST", self.path, self.headers.get("Authorization")))
        if srv.refresh_status != 200:
            return self._send(srv.refresh_status, b'{"detail": "no"}')
        srv.issued += 1
        self._send(200, json.dumps({"access": _jwt({"exp": time.time() + 3600, "n": srv.issued})}).encode())

    def do_GET(self):  # noqa: N802
        srv = self.server
        auth = self.headers.get("Authorization")
        srv.seen.append(("GET", self.path, auth))
        if self.path == "/data/upload/revoked.png" and auth == srv.first_bearer():
            return self._send(401, b"revoked")
        if self.path == "/data/upload/out.png":
            return self._redirect(srv.other + "/elsewhere.png")
        if self.path == "/data/upload/loop.png":
            return self._redirect("/data/upload/loop.png")
        self._send(200, PNG)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), LabelStudioLike)
        self.seen: list[tuple[str, str, str | None]] = []
        self.refresh_status, self.issued, self.other = 200, 0, ""
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.first_bearer = lambda: None


@pytest.fixture()
def servers():
    ls, other = Server(), Server()
    ls.other = other.url
    first = {}

    def first_bearer() -> str | None:  # the first access token issued, whatever its exp
        for method, _path, auth in ls.seen:
            if method == "GET" and auth:
                first.setdefault("token", auth)
        return first.get("token")

    ls.first_bearer = first_bearer
    for s in (ls, other):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield ls, other
    for s in (ls, other):
        s.shutdown()


def fetcher(ls_url: str, **env) -> ImageFetcher:
    return ImageFetcher(Settings.from_env({"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": PAT,
                                           "SAM_FETCH_TIMEOUT_S": "5", **env}))


@pytest.mark.parametrize(("status", "posts"), [(401, 1), (500, 1 + MAX_RETRIES)])  # 5xx: bounded retries
def test_a_refused_token_refresh_is_a_clear_error_without_the_token(servers, status, posts):
    ls, _ = servers
    ls.refresh_status = status
    with pytest.raises(LabelStudioError) as info:
        fetcher(ls.url).load("/data/upload/a.png")
    assert info.value.status == 502 and f"HTTP {status}" in info.value.message
    assert "create a new personal access token" in info.value.message and PAT not in info.value.message
    assert [(m, p) for m, p, _ in ls.seen] == [("POST", "/api/token/refresh/")] * posts  # and no image request


def test_a_401_on_an_image_refreshes_once_and_retries_once(servers):
    ls, _ = servers
    loaded = fetcher(ls.url).load("/data/upload/revoked.png")
    assert loaded.pixels.shape == (12, 16, 3)
    calls = [(m, p) for m, p, _ in ls.seen]
    assert calls == [("POST", "/api/token/refresh/"), ("GET", "/data/upload/revoked.png"),
                     ("POST", "/api/token/refresh/"), ("GET", "/data/upload/revoked.png")]
    first, second = ls.seen[1][2], ls.seen[3][2]
    assert first.startswith("Bearer ") and second.startswith("Bearer ") and first != second


def test_credentials_are_dropped_when_a_redirect_leaves_label_studio(servers):
    ls, other = servers
    loaded = fetcher(ls.url, SAM_ALLOWED_HOSTS="127.0.0.1").load("/data/upload/out.png")
    assert loaded.pixels.shape == (12, 16, 3)
    assert ls.seen[-1][2] is not None and ls.seen[-1][2].startswith("Bearer ")  # Label Studio got the token
    assert other.seen == [("GET", "/elsewhere.png", None)]  # the other host got no Authorization


def test_the_redirect_cap(servers):
    ls, _ = servers
    with pytest.raises(ImageError, match=f"more than {MAX_REDIRECTS} redirects") as info:
        fetcher(ls.url).load("/data/upload/loop.png")
    assert info.value.status == 502
    assert sum(1 for m, p, _ in ls.seen if p == "/data/upload/loop.png") == MAX_REDIRECTS + 1
