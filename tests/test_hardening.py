"""Hostile input, faults and load. Every connection goes to loopback: the link-local and private
cases are checked at the address level, with the socket layer patched to fail the test if reached."""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from synthetic import iou, textured_background
from werkzeug.serving import make_server

from sam_backend.config import Settings
from sam_backend.labelstudio.context import parse_context
from sam_backend.labelstudio.images import MAX_RETRIES, ImageError, ImageFetcher, decode_image
from sam_backend.labelstudio.netguard import AddressPolicy, BlockedAddress, describe
from sam_backend.segment.engines import EngineError
from sam_backend.segment.engines.grabcut import GrabCutEngine
from sam_backend.segment.prompts import ObjectPrompt, PromptError
from sam_backend.serving.app import create_app
from sam_backend.serving.backend import SamBackend

PNG = io.BytesIO()
Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(PNG, format="PNG")
PNG = PNG.getvalue()


# -- a scriptable loopback server ----------------------------------------------------------------

class Script(BaseHTTPRequestHandler):
    """Answers by path: see `do_GET`. Counts requests per path."""

    counts: dict[str, int] = {}
    redirect_to = ""

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0].removeprefix("/data")  # Label Studio paths and plain ones alike
        Script.counts[path] = Script.counts.get(path, 0) + 1
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")
        elif path == "/reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif path == "/cut":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG[:40])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif path == "/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(40):
                    chunk = b"y" * 65536
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", Script.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    def log_message(self, *args):
        pass


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(host: str = "127.0.0.1"):
    cls = V6Server if ":" in host else ThreadingHTTPServer
    httpd = cls((host, 0), Script)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    return httpd, f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@pytest.fixture()
def ls_server():
    Script.counts = {}
    httpd, url = serve()
    yield url
    httpd.shutdown()


@pytest.fixture()
def no_outside_connections(monkeypatch):
    """Fail the test if anything tries to open a socket to a non-loopback address."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0]
        if not (host.startswith("127.") or host in ("::1", "localhost")):
            raise AssertionError(f"a connection to {address} was attempted")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def fetcher(ls_url: str | None = None, **env) -> ImageFetcher:
    values = {"SAM_FETCH_TIMEOUT_S": "2", **env}
    if ls_url:
        values["LABEL_STUDIO_URL"] = ls_url
    return ImageFetcher(Settings.from_env(values))


# -- 1. SSRF ----------------------------------------------------------------------------------------

BLOCKED = ["127.0.0.1", "127.0.0.2", "169.254.169.254", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
           "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe", "::"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_recognised(address):
    import ipaddress

    assert describe(ipaddress.ip_address(address)) is not None
    with pytest.raises(BlockedAddress):
        AddressPolicy().check("somewhere.example", 80, [address])


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass_the_check(address):
    import ipaddress

    assert describe(ipaddress.ip_address(address)) is None  # not classed as non-public
    assert AddressPolicy().check("somewhere.example", 80, [address]) is None  # a pure check: no connection is made
    # The same answer with one private address in it is refused: every resolved address counts.
    with pytest.raises(BlockedAddress, match="10.0.0.1"):
        AddressPolicy().check("somewhere.example", 80, [address, "10.0.0.1"])


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/a.png",
                                 "http://192.168.0.10:8080/a.png", "http://[fe80::1]/a.png", "http://[fd00::5]/a.png",
                                 "http://[::ffff:169.254.169.254]/a.png"])
def test_private_and_link_local_urls_are_refused_before_connecting(url, no_outside_connections):
    with pytest.raises(ImageError, match="refused") as info:
        fetcher().load(url)
    assert info.value.status == 403


def test_dns_answer_is_checked_at_connect_time(monkeypatch, no_outside_connections):
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host == "images.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(ImageError, match="10.0.0.5, a private address"):
        fetcher().load("http://images.example/cat.png")


@pytest.mark.parametrize("host", ["127.0.0.2", "::1"])
def test_other_loopback_hosts_are_refused_but_allowed_when_listed(host, ls_server):
    httpd, url = serve(host)
    try:
        with pytest.raises(ImageError, match="loopback"):
            fetcher(ls_server).load(url + "/a.png")
        assert Script.counts.get("/a.png") is None  # nothing reached the server
        allowed = fetcher(ls_server, SAM_ALLOWED_HOSTS=host).load(url + "/a.png")
        assert allowed.pixels.shape == (12, 16, 3)
    finally:
        httpd.shutdown()


def test_label_studio_host_is_allowed_but_not_its_other_ports(ls_server):
    assert fetcher(ls_server).load("/data/upload/1/a.png").pixels.shape == (12, 16, 3)
    other, other_url = serve()
    try:
        with pytest.raises(ImageError, match="loopback"):
            fetcher(ls_server).load(other_url + "/a.png")
    finally:
        other.shutdown()


@pytest.mark.parametrize(("target", "status", "reason"), [
    ("http://169.254.169.254/latest/meta-data/", 403, "link-local address"),
    ("file:///etc/passwd", 400, "only http and https URLs are fetched"),
    ("http://127.0.0.2:9/x.png", 403, "loopback address")])
def test_redirects_to_forbidden_places_are_refused(target, status, reason, ls_server, no_outside_connections):
    Script.redirect_to = target
    with pytest.raises(ImageError, match=reason) as info:
        fetcher(ls_server).load("/data/redirect")
    assert info.value.status == status


def test_redirect_within_label_studio_is_followed(ls_server):
    Script.redirect_to = "/data/upload/1/b.png"
    assert fetcher(ls_server).load("/data/redirect").pixels.shape == (12, 16, 3)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1/x",
                                 "data:image/png;base64,AAAA"])
def test_other_schemes_are_refused(url, tmp_path):
    with pytest.raises(ImageError, match="expected an http\\(s\\) URL, a Label Studio /data/ path") as info:
        fetcher(LOCAL_FILES_DOCUMENT_ROOT=str(tmp_path)).load(url)
    assert info.value.status == 400


def test_scheme_relative_url_is_a_path_outside_the_root(tmp_path):
    with pytest.raises(ImageError, match="outside LOCAL_FILES_DOCUMENT_ROOT") as info:
        fetcher(LOCAL_FILES_DOCUMENT_ROOT=str(tmp_path)).load("//evil.example/a.png")
    assert info.value.status == 403


# -- 2. path traversal -------------------------------------------------------------------------------

def test_path_traversal_is_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", root / "leak.png")
    os.symlink(root / "sub" / "ok.png", root / "inside.png")
    f = fetcher(LOCAL_FILES_DOCUMENT_ROOT=str(root))
    assert f.load("/data/local-files/?d=sub/ok.png").pixels.shape == (12, 16, 3)
    assert f.load("/data/local-files/?d=inside.png").pixels.shape == (12, 16, 3)
    for bad in ["/data/local-files/?d=../secret.png", "/data/local-files/?d=sub/../../secret.png",
                f"/data/local-files/?d={tmp_path / 'secret.png'}", "/data/local-files/?d=leak.png",
                "/data/local-files/?d=%2E%2E/secret.png", str(tmp_path / "secret.png")]:
        with pytest.raises(ImageError, match="outside") as info:
            f.load(bad)
        assert info.value.status == 403, bad


# -- 3. size and time ---------------------------------------------------------------------------------

def test_trickling_server_is_cut_at_the_deadline(ls_server):
    f = fetcher(SAM_FETCH_TIMEOUT_S="0.5", SAM_ALLOWED_HOSTS="127.0.0.1")
    with pytest.raises(ImageError, match="longer than 2 s") as info:
        f.load(ls_server + "/trickle")  # 1000 bytes at 5 B/s would take 200 s
    assert info.value.status == 504


def test_streamed_body_over_the_cap_is_refused(ls_server):
    with pytest.raises(ImageError, match="over the limit") as info:
        fetcher(SAM_MAX_IMAGE_MB="1", SAM_ALLOWED_HOSTS="127.0.0.1").load(ls_server + "/chunked-big")
    assert info.value.status == 413


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ImageError, match="pixels") as info:
        decode_image(png_declaring(30000, 30000), 50_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Refused from the header: the 900-megapixel image (2.7 GB of RGB) was never allocated.
    assert info.value.status == 413 and peak < 10 * 1024 * 1024


# -- 4. malformed images (more in test_images.py) -------------------------------------------------------

def test_multi_frame_gif_and_animated_png():
    frames = [Image.new("RGB", (10, 10), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="GIF"):
        decode_image(buf.getvalue(), 10**6)
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), 10**6)  # APNG: the first frame
    assert out.shape == (10, 10, 3) and tuple(out[0, 0]) == (255, 0, 0)


# -- 5. fuzzing ------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=12)
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-1000, 1000) | st.text(max_size=3) | st.none()
results = st.fixed_dictionaries(
    {"type": st.sampled_from(["keypointlabels", "rectanglelabels", "brushlabels", "keypoint", None, 3]),
     "original_width": numbers, "original_height": numbers,
     "value": st.fixed_dictionaries({"x": numbers, "y": numbers, "width": numbers, "height": numbers,
                                     "rotation": numbers}, optional={"keypointlabels": json_values,
                                                                     "rectanglelabels": json_values,
                                                                     "positive": json_values}) | json_values},
    optional={"is_positive": json_values, "from_name": json_values, "to_name": json_values})
contexts = st.one_of(json_values, st.fixed_dictionaries({"result": st.lists(results | json_values, max_size=5)}))


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(context=contexts, size=st.none() | st.tuples(st.integers(1, 4000), st.integers(1, 4000)))
def test_fuzz_prompt_parser(context, size):
    try:
        prompts = parse_context(context, image_size=size)
    except PromptError:
        return
    for p in prompts:
        assert isinstance(p, ObjectPrompt) and np.isfinite(p.points).all()
        w, h = p.image_size
        assert ((p.points >= 0) & (p.points <= [w, h])).all()
        if p.box is not None:
            assert np.isfinite(p.box).all() and p.box[0] < p.box[2] <= w and p.box[1] < p.box[3] <= h


def _seed_images() -> list[bytes]:
    out = []
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 13, 3), dtype=np.uint8))
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB"),
                      ("PNG", "I;16"), ("JPEG", "CMYK")):
        buf = io.BytesIO()
        (img.convert(mode) if mode != "I;16" else Image.fromarray(np.zeros((4, 4), np.uint16))).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the damaged TIFF tags we feed it
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=256) | mutated_images())
def test_fuzz_image_decoder(data):
    try:
        out = decode_image(data, 10**6)
    except ImageError as exc:
        assert exc.message and 400 <= exc.status < 600
        return
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8


# -- 6. faults ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "requests_made", "status"), [(429, 1 + MAX_RETRIES, 502), (500, 1 + MAX_RETRIES, 502),
                                                                (503, 1 + MAX_RETRIES, 502), (404, 1, 424),
                                                                (401, 1, 424)])
def test_label_studio_errors_are_retried_only_when_it_helps(ls_server, code, requests_made, status):
    with pytest.raises(ImageError) as info:
        fetcher(ls_server).load(f"/data/status/{code}")
    assert Script.counts[f"/status/{code}"] == requests_made and info.value.status == status
    assert str(code) in info.value.message or "not found" in info.value.message


def test_connection_reset_is_a_clear_error(ls_server):
    with pytest.raises(ImageError, match=r"/data/reset: cannot connect \(ConnectionError\)") as info:
        fetcher(ls_server).load("/data/reset")
    assert info.value.status == 502 and Script.counts["/reset"] == 1  # a reset answer is not retried


def local_settings(root, **env) -> Settings:
    return Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(root), "SAM_METADATA_DB": str(root / "s.db"), **env})


def running_backend(settings: Settings, engine):
    backend = SamBackend(settings, engine_factory=lambda: engine)
    server = make_server("127.0.0.1", 0, create_app(settings, backend=backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return backend, server, f"http://127.0.0.1:{server.server_address[1]}"


CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""


def click(image: str, x: float, y: float, w: int, h: int) -> dict:
    return {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG, "params": {"context": {"result": [
        {"original_width": w, "original_height": h, "type": "keypointlabels", "from_name": "kp", "to_name": "image",
         "is_positive": True, "value": {"x": x / w * 100, "y": y / h * 100, "keypointlabels": ["Object"]}}]}}}


def test_download_cut_mid_stream_leaves_nothing_cached(ls_server, tmp_path):
    settings = Settings.from_env({"LABEL_STUDIO_URL": ls_server, "SAM_METADATA_DB": str(tmp_path / "s.db")})
    backend, server, url = running_backend(settings, GrabCutEngine())
    try:
        r = requests.post(url + "/predict", json=click("/data/cut", 8, 6, 16, 12), timeout=30)
        assert r.status_code == 502 and "broke off" in r.json()["errors"][0]
        assert backend.cache.stats().entries == 0 and backend.memory.images.stats().entries == 0
        r = requests.post(url + "/predict", json=click("/data/upload/ok.png", 8, 6, 16, 12), timeout=30)
        assert r.status_code == 200
    finally:
        server.shutdown()


# -- 7. load -----------------------------------------------------------------------------------------------

def disc_png(path, center, h=240, w=320, seed=0):
    image = textured_background(h, w, seed)
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, center, 45, 1, -1)
    image[mask > 0] = (230, 120, 30)
    cv2.imwrite(str(path), image[:, :, ::-1])
    return mask.astype(bool)


def test_eight_clients_on_eight_images_get_their_own_masks(tmp_path):
    truths = {}
    for i in range(8):
        center = (60 + 25 * i, 60 + 15 * i)
        truths[i] = (center, disc_png(tmp_path / f"img{i}.png", center, seed=i))
    settings = local_settings(tmp_path)
    backend, server, url = running_backend(settings, GrabCutEngine())

    def one(i):
        (cx, cy), _ = truths[i]
        r = requests.post(url + "/predict", json=click(f"/data/local-files/?d=img{i}.png", cx, cy, 320, 240),
                          timeout=60)
        from label_studio_sdk.converter.brush import decode_rle

        res = r.json()["results"][0]["result"][0]
        return i, decode_rle(res["value"]["rle"]).reshape(240, 320, 4)[:, :, 3] > 0

    try:
        with ThreadPoolExecutor(8) as pool:
            for i, mask in pool.map(one, range(8)):
                assert iou(mask, truths[i][1]) >= 0.8
                assert all(iou(mask, truths[j][1]) < 0.5 for j in truths if j != i)
    finally:
        server.shutdown()


class CountingEngine(GrabCutEngine):
    """GrabCut with an encode that takes 0.5 s (so that 50 requests overlap) and a call counter."""

    def __init__(self):
        super().__init__()
        self.embeds = 0

    def embed(self, image):
        self.embeds += 1
        time.sleep(0.5)
        return super().embed(image)


def test_fifty_concurrent_clicks_on_one_new_image_encode_it_once(tmp_path):
    _ = disc_png(tmp_path / "one.png", (160, 120))
    settings = local_settings(tmp_path)
    engine = CountingEngine()
    backend, server, url = running_backend(settings, engine)
    try:
        with ThreadPoolExecutor(50) as pool:
            codes = list(pool.map(lambda _: requests.post(
                url + "/predict", json=click("/data/local-files/?d=one.png", 160, 120, 320, 240), timeout=120
            ).status_code, range(50)))
        assert codes == [200] * 50 and engine.embeds == 1 and backend.cache.stats().misses == 1
    finally:
        server.shutdown()


@pytest.mark.slow
def test_health_answers_while_vit_b_encodes(tmp_path):
    from sam_backend.segment.engines.sam import SamEngine

    for i in range(2):
        disc_png(tmp_path / f"big{i}.png", (300, 300), h=768, w=1024, seed=i)
    settings = local_settings(tmp_path)
    backend, server, url = running_backend(settings, SamEngine.random("vit_b", device="cpu"))
    polls, done = [], threading.Event()  # (status, an encode was running before and after the call)

    def poll():
        while not done.is_set():
            before = backend.encoder.gate.running_key is not None
            status = requests.get(url + "/health", timeout=10).status_code
            polls.append((status, before and backend.encoder.gate.running_key is not None))
            time.sleep(0.05)

    try:
        poller = threading.Thread(target=poll)
        poller.start()
        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(
                lambda i: requests.post(url + "/predict", json=click(f"/data/local-files/?d=big{i}.png", 300, 300,
                                                                     1024, 768), timeout=300), range(2)))
        done.set()
        poller.join()
        assert [r.status_code for r in responses] == [200, 200]
        assert [len(r.json()["results"]) for r in responses] == [1, 1]
        assert backend.cache.stats().misses == 2
        # /health kept answering (200, within the 10 s client timeout) while encodes ran: the latency
        # figures themselves are in benchmarks/bench_server.py.
        assert polls and {status for status, _ in polls} == {200}
        assert sum(during for _, during in polls) >= 3
    finally:
        done.set()
        server.shutdown()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_within_the_cache_cap_over_200_images(tmp_path):
    cap_mb = 4
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path), "SAM_CACHE_MB": str(cap_mb),
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    backend = SamBackend(settings, engine_factory=GrabCutEngine)
    client = create_app(settings, backend=backend).test_client()
    rng = np.random.default_rng(0)
    baseline = None
    for i in range(200):
        image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "cur.png"), image)
        (tmp_path / f"i{i}.png").write_bytes((tmp_path / "cur.png").read_bytes())
        r = client.post("/predict", json=click(f"/data/local-files/?d=i{i}.png", 160, 120, 320, 240))
        assert r.status_code == 200
        os.unlink(tmp_path / f"i{i}.png")
        if i == 19:
            baseline = rss_bytes()
    growth = rss_bytes() - baseline
    stats = backend.cache.stats()
    assert stats.misses == 200 and stats.bytes <= cap_mb * 1024 * 1024 and stats.evictions > 150
    assert growth < (cap_mb + 32) * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"


# -- 8. secrets -------------------------------------------------------------------------------------------

def test_redaction_filter_masks_keys_and_headers():
    import logging

    from sam_backend.serving.app import RedactSecrets

    flt = RedactSecrets(["s3cr3t-key-value"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s and Authorization: Bearer abcdefghijklmn",
                               ("s3cr3t-key-value",), None)
    flt.filter(record)
    text = record.getMessage()
    assert "s3cr3t-key-value" not in text and "abcdefghijklmn" not in text and "<redacted>" in text


def test_api_key_never_reaches_logs_or_responses(ls_server, tmp_path, caplog):
    import logging

    key = "0123456789abcdef0123456789abcdef01234567"
    settings = Settings.from_env({"LABEL_STUDIO_URL": ls_server, "LABEL_STUDIO_API_KEY": key,
                                  "SAM_METADATA_DB": str(tmp_path / "s.db")})
    backend = SamBackend(settings, engine_factory=GrabCutEngine)
    client = create_app(settings, backend=backend).test_client()
    with caplog.at_level(logging.DEBUG):
        bodies = [client.post("/predict", json=click(path, 8, 6, 16, 12)).get_data(as_text=True)
                  for path in ("/data/upload/a.png", "/data/status/401", "/data/status/500", "/data/reset")]
        bodies.append(client.post("/setup", json={"schema": CONFIG, "access_token": key}).get_data(as_text=True))
    assert all(key not in b for b in bodies) and key not in caplog.text and "Token " + key[:6] not in caplog.text


def test_checkpoint_with_a_pickle_payload_is_refused_at_start_and_the_payload_never_runs(tmp_path):
    import pickle

    import torch

    from sam_backend.segment.engines.sam import SamEngine

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder.pos_embed": Payload()}, evil, pickle_module=pickle)
    settings = local_settings(tmp_path)
    backend = SamBackend(settings, engine_factory=lambda: SamEngine.from_checkpoint(evil, device="cpu"))
    client = create_app(settings, backend=backend).test_client()
    r = client.post("/predict", json=click("/data/local-files/?d=x.png", 1, 1, 16, 12))
    assert r.status_code == 503 and "refused to load" in r.json["errors"][0]
    assert not marker.exists() and "refused to load" in client.get("/health").json["engine_error"]
    # The official file name carries a known digest: a wrong file is refused before unpickling.
    wrong = Settings.from_env({"SAM_CHECKPOINT_DIR": str(tmp_path), "SAM_METADATA_DB": str(tmp_path / "s.db")})
    with pytest.raises(EngineError, match="SHA-256"):
        SamEngine.from_settings(wrong)
    assert not marker.exists()


def test_passwords_in_store_and_database_urls_are_redacted_from_logs():
    import logging

    from sam_backend.serving.app import install_redaction

    settings = Settings.from_env({"SAM_METADATA_DB": "postgresql://sam:pg-pass-9876@127.0.0.1:5432/sam",
                                  "SAM_EMBEDDING_STORE": "redis://:redis-pass-5432@127.0.0.1:6379/0"})
    handler = logging.Handler()
    seen: list[str] = []
    handler.emit = lambda record: seen.append(record.getMessage())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_redaction(settings)
        logging.getLogger("sam_backend.test").warning("connecting to %s and %s", settings.metadata_db,
                                                      settings.embedding_store)
    finally:
        root.removeHandler(handler)
    assert seen and "pg-pass-9876" not in seen[0] and "redis-pass-5432" not in seen[0] and "<redacted>" in seen[0]
