"""Image decoding and fetching: formats, modes, EXIF, limits, and where credentials go (loopback servers only)."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_backend.config import Settings
from sam_backend.labelstudio.images import ImageError, ImageFetcher, decode_image, safe_url


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = np.zeros((20, 30, 3), np.uint8)
RGB[:, :15] = (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "BMP"])
def test_allowed_formats_decode_to_rgb(fmt):
    out = decode_image(encode(Image.fromarray(RGB), fmt), 10**6)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert out[10, 5, 0] > 200 and out[10, 25, 0] < 50


@pytest.mark.parametrize("mode", ["L", "P", "CMYK"])
def test_modes_become_rgb_as_pillow_converts_them(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(Image.fromarray(RGB).convert(mode), fmt)
    out = decode_image(data, 10**6)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8 and np.array_equal(out, expected)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_transparent_pixels_are_composited_on_white(mode):
    img = Image.fromarray(RGB).convert(mode)
    alpha = np.full((20, 30), 255, np.uint8)
    alpha[:, 15:] = 64  # the right half mostly transparent
    img.putalpha(Image.fromarray(alpha))
    out = decode_image(encode(img, "PNG"), 10**6)
    colour = np.asarray(img.convert("RGB"), dtype=np.float64)
    a = alpha[:, :, None] / 255.0
    expected = colour * a + 255.0 * (1 - a)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0
    assert (out[:, 20:] > 150).all()  # dark pixels behind alpha 64 turned light


def test_16_bit_greyscale_is_scaled_to_8_bits():
    ramp = np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(ramp), "PNG"), 10**6)
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert out.shape == (20, 30, 3) and np.array_equal(out[:, :, 0], expected)
    assert np.array_equal(out[:, :, 0], out[:, :, 2]) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_exif_orientation_is_applied():
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(RGB, 1)))  # 30 x 20 stored
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(stored, "JPEG", exif=exif, quality=95), 10**6)
    assert out.shape == (20, 30, 3) and out[10, 5, 0] > 200 and out[10, 25, 0] < 50


@pytest.mark.parametrize(("data", "needle"), [
    (b"", "empty"),
    (b"<!DOCTYPE html><html><body>login</body></html>", "HTML"),
    (encode(Image.fromarray(RGB), "JPEG")[:200], "truncated or damaged"),
    (encode(Image.fromarray(RGB), "GIF"), "format GIF is not accepted"),
    (b"\x00\x01garbage" * 10, "not a recognised image"),
    # a TIFF whose strip-offsets tag is damaged: PIL raised TypeError from load() (found by the decoder fuzz test)
    ((Path(__file__).parent / "fixtures" / "damaged-tiff-tag.tif").read_bytes(), "truncated or damaged"),
])
def test_bad_bytes_give_clear_errors(data, needle):
    with pytest.raises(ImageError, match=needle):
        decode_image(data, 10**6)


def test_pixel_limit_is_checked_before_decoding():
    big = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageError, match="exceeds the limit") as info:
        decode_image(big, 1_000_000)
    assert info.value.status == 413


def test_safe_url_drops_query_and_credentials():
    assert safe_url("https://user:pw@host.example:8443/a/b.png?X-Amz-Signature=abc") == "https://host.example:8443/a/b.png"


class Recorder(BaseHTTPRequestHandler):
    seen: list = []
    body = encode(Image.fromarray(RGB), "PNG")
    status = 200

    def do_GET(self):  # noqa: N802
        Recorder.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(Recorder.status)
        self.send_header("Content-Length", str(len(Recorder.body)))
        self.end_headers()
        self.wfile.write(Recorder.body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def two_servers():
    Recorder.seen, Recorder.status = [], 200
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Recorder) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()


def test_credentials_go_only_to_the_label_studio_host(two_servers):
    ls, other = two_servers
    legacy = "0123456789abcdef0123456789abcdef01234567"
    fetcher = ImageFetcher(Settings.from_env({"LABEL_STUDIO_URL": ls, "LABEL_STUDIO_API_KEY": legacy,
                                              "SAM_ALLOWED_HOSTS": "127.0.0.1"}))
    assert fetcher.load("/data/upload/1/a.png").pixels.shape == (20, 30, 3)
    fetcher.load(other + "/b.png")
    assert Recorder.seen == [("/data/upload/1/a.png", f"Token {legacy}"), ("/b.png", None)]


def test_label_studio_401_says_what_to_do(two_servers):
    Recorder.status = 401
    fetcher = ImageFetcher(Settings.from_env({"LABEL_STUDIO_URL": two_servers[0]}))
    with pytest.raises(ImageError, match="set LABEL_STUDIO_API_KEY to a personal access token"):
        fetcher.load("/data/upload/1/a.png")


def test_declared_size_over_the_cap_is_refused(two_servers):
    Recorder.body = b"x" * (2 * 1024 * 1024)
    try:
        fetcher = ImageFetcher(Settings.from_env({"SAM_MAX_IMAGE_MB": "1", "SAM_ALLOWED_HOSTS": "127.0.0.1"}))
        with pytest.raises(ImageError, match="over the limit") as info:
            fetcher.load(two_servers[1] + "/big.png")
        assert info.value.status == 413
    finally:
        Recorder.body = encode(Image.fromarray(RGB), "PNG")


def test_relative_label_studio_path_without_url_says_so():
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL is not set"):
        ImageFetcher(Settings.from_env({})).load("/data/upload/1/a.png")
