"""Task image → `(H, W, 3) uint8 RGB` array: resolve the URL, fetch with auth and limits, decode safely.

URLs a task can hold:
- `/data/upload/...` and `/data/local-files/?d=...`: Label Studio's own, resolved against
  `LABEL_STUDIO_URL` (else the `hostname` Label Studio sent to `/setup`); the API key goes only to
  `LABEL_STUDIO_URL` (`Settings` refuses a key without it), never to a `/setup` hostname;
- `http(s)://...`: fetched as is; the Label Studio credentials go only to the Label Studio host;
- a local path (or `/data/local-files/?d=`) under `LOCAL_FILES_DOCUMENT_ROOT`: read from disk.

Limits: `SAM_MAX_IMAGE_MB` on the body (declared and streamed), `SAM_MAX_IMAGE_PIXELS` checked
from the header before any pixel is decoded, `SAM_FETCH_TIMEOUT_S` per read. Formats: JPEG,
PNG, WebP, TIFF, BMP. EXIF orientation is applied; L, LA, P, RGBA, CMYK and 16-bit images are
converted to 8-bit RGB.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from urllib3.util.retry import Retry

from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.auth import LabelStudioAuth
from sam_backend.labelstudio.netguard import AddressPolicy, BlockedAddress, guarded_adapter

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "MPO")
MAX_REDIRECTS = 3
MAX_RETRIES = 2  # on 429 and 5xx only, with backoff


class ImageError(ClientError):
    """The task's image cannot be had (422 unless a more precise status fits)."""

    default_status = 422


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the SHA-256 of its file bytes (the cache and sidecar key)."""

    pixels: np.ndarray  # (H, W, 3) uint8 RGB, EXIF orientation applied
    sha256: str
    url: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to `(H, W, 3) uint8 RGB`; raises `ImageError` (422) with the reason."""
    if not data:
        raise ImageError("image: the body is empty; expected JPEG, PNG, WebP, TIFF or BMP bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in ALLOWED_FORMATS:
                raise ImageError(f"image: format {fmt or 'unknown'} is not accepted; expected JPEG, PNG, WebP, "
                                 "TIFF or BMP")
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image: {width}x{height} = {width * height} pixels exceeds the limit of "
                                 f"{max_pixels} (SAM_MAX_IMAGE_PIXELS)", status=413)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image: refused before decoding: {str(exc).split(',')[0]} (SAM_MAX_IMAGE_PIXELS is "
                         f"{max_pixels})", status=413) from None
    except UnidentifiedImageError:
        raise ImageError(_describe_bad_bytes(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:  # TypeError: PIL on a damaged TIFF tag
        raise ImageError(f"image: cannot decode ({exc.__class__.__name__}: {str(exc)[:120]}); "
                         "the file is truncated or damaged") from None


def _describe_bad_bytes(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"{")):
        return ("image: got a text/HTML document instead of an image (a login page or an error page?); "
                "check LABEL_STUDIO_API_KEY and the task's URL")
    return f"image: not a recognised image ({len(data)} bytes, starts with {data[:8].hex()}); expected JPEG, PNG, " \
           "WebP, TIFF or BMP"


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode → `(H, W, 3) uint8 RGB`; 16/32-bit greyscale is scaled to its 8-bit range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    rgb = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


class ImageFetcher:
    """Loads task images; thread-safe; one HTTP session with bounded retries on 429/5xx."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.session = session or requests.Session()
        self.session.trust_env = False  # an environment proxy would fetch on our behalf, past the address policy
        retry = Retry(total=MAX_RETRIES, connect=1, read=0, status=MAX_RETRIES, backoff_factor=0.3,
                      status_forcelist=(429, 500, 502, 503, 504), allowed_methods=("GET", "POST"),
                      respect_retry_after_header=True, raise_on_status=False, redirect=False)
        self.policy = AddressPolicy(settings.allowed_hosts)
        adapter = guarded_adapter(self.policy, max_retries=retry, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.auth = LabelStudioAuth(settings.label_studio_api_key, self.session, settings.fetch_timeout_s)
        self._setup_hostname: str | None = None
        self._exempt(settings.label_studio_url)

    def _exempt(self, url: str | None) -> None:
        if url:
            parts = urlsplit(url)
            if parts.hostname:
                self.policy.exempt.add((parts.hostname.lower(), parts.port or _default_port(parts.scheme)))

    @property
    def setup_hostname(self) -> str | None:
        return self._setup_hostname

    @setup_hostname.setter
    def setup_hostname(self, url: str | None) -> None:
        """The `hostname` from `/setup`: used only without LABEL_STUDIO_URL, and only where the address policy allows
        its address (public, or named in SAM_ALLOWED_HOSTS): anyone can call `/setup`, so it never widens the policy."""
        self._setup_hostname = url

    @property
    def label_studio_url(self) -> str | None:
        return self.settings.label_studio_url or self.setup_hostname

    def load(self, url: str) -> LoadedImage:
        """Fetch and decode the image at `url` (see the module docstring for what `url` may be)."""
        data = self.fetch_bytes(url)
        pixels = decode_image(data, self.settings.max_image_pixels)
        return LoadedImage(pixels, hashlib.sha256(data).hexdigest(), url)

    def fetch_bytes(self, url: str) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task image: expected a URL or path, got {url!r}", status=400)
        url = url.strip()
        parts = urlsplit(url)
        if parts.scheme in ("http", "https"):
            return self._http(url)
        if parts.scheme == "" and url.startswith("/data/local-files"):
            if self.settings.local_files_root is not None:
                rel = parse_qs(parts.query).get("d", [""])[0]
                return self._local(rel)
            return self._http(self._ls_url(url))
        if parts.scheme == "" and url.startswith("/data/"):
            return self._http(self._ls_url(url))
        if parts.scheme == "" and self.settings.local_files_root is not None:
            return self._local(url)
        raise ImageError(f"task image {safe_url(url)!r}: expected an http(s) URL, a Label Studio /data/ path, or a "
                         "path under LOCAL_FILES_DOCUMENT_ROOT", status=400)

    def _ls_url(self, path: str) -> str:
        base = self.label_studio_url
        if not base:
            raise ImageError(f"task image {path!r} is a Label Studio path but LABEL_STUDIO_URL is not set (and no "
                             "/setup call gave a hostname); set LABEL_STUDIO_URL", status=400)
        return base.rstrip("/") + path

    def _is_label_studio(self, url: str) -> bool:
        base = self.label_studio_url
        if not base:
            return False
        a, b = urlsplit(url), urlsplit(base)
        return (a.scheme, a.hostname, a.port or _default_port(a.scheme)) == (
            b.scheme, b.hostname, b.port or _default_port(b.scheme))

    def _http(self, url: str) -> bytes:
        resp, url, to_ls = self._get_following(url)
        with resp:
            if resp.status_code != 200:
                raise ImageError(_status_message(resp.status_code, safe_url(url), to_ls, self.auth.configured),
                                 status=502 if resp.status_code >= 500 or resp.status_code == 429 else 424)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.settings.max_image_bytes:
                raise ImageError(f"image {safe_url(url)}: {int(declared)} bytes declared, over the limit of "
                                 f"{self.settings.max_image_bytes} (SAM_MAX_IMAGE_MB)", status=413)
            buf = bytearray()
            deadline = time.monotonic() + 4 * self.settings.fetch_timeout_s
            try:
                # read1 returns whatever has arrived, so a server trickling bytes meets the deadline.
                while chunk := resp.raw.read1(64 * 1024, decode_content=True):
                    buf += chunk
                    if len(buf) > self.settings.max_image_bytes:
                        raise ImageError(f"image {safe_url(url)}: over the limit of "
                                         f"{self.settings.max_image_bytes} bytes (SAM_MAX_IMAGE_MB)", status=413)
                    if time.monotonic() > deadline:
                        raise ImageError(f"image {safe_url(url)}: download took longer than "
                                         f"{4 * self.settings.fetch_timeout_s:.0f} s", status=504)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise ImageError(f"image {safe_url(url)}: download broke off ({exc.__class__.__name__})",
                                 status=502) from None
            identity = resp.headers.get("Content-Encoding", "identity").lower() == "identity"
            if identity and declared and declared.isdigit() and len(buf) != int(declared):
                raise ImageError(f"image {safe_url(url)}: got {len(buf)} of {declared} bytes; the download broke off",
                                 status=502)
            return bytes(buf)

    def _get_following(self, url: str) -> tuple[requests.Response, str, bool]:
        """GET with up to MAX_REDIRECTS redirects followed by hand: each hop is checked (scheme, address
        policy at connect) and gets the Label Studio credentials only if it is the Label Studio host."""
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise ImageError(f"image {safe_url(url)}: only http and https URLs are fetched", status=400)
            to_ls = self._is_label_studio(url)
            # Credentials go only to the address the operator configured, never to a `/setup` hostname.
            configured = self.settings.label_studio_url
            send_key = to_ls and configured is not None and self.auth.configured
            resp = self._get(url, self.auth.header(configured) if send_key else {})
            if resp.status_code == 401 and send_key:
                resp.close()
                self.auth.invalidate()  # an access token may have been revoked early: renew once
                resp = self._get(url, self.auth.header(configured))
            if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                continue
            return resp, url, to_ls
        raise ImageError(f"image {safe_url(url)}: more than {MAX_REDIRECTS} redirects", status=502)

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                    timeout=(min(5.0, self.settings.fetch_timeout_s), self.settings.fetch_timeout_s))
        except BlockedAddress as exc:
            raise ImageError(f"image {safe_url(url)} refused: {exc}", status=403) from None
        except requests.Timeout:
            raise ImageError(f"image {safe_url(url)}: no answer within {self.settings.fetch_timeout_s:.0f} s "
                             "(SAM_FETCH_TIMEOUT_S)", status=504) from None
        except requests.RequestException as exc:
            raise ImageError(f"image {safe_url(url)}: cannot connect ({exc.__class__.__name__})", status=502) from None

    def _local(self, rel: str) -> bytes:
        root = self.settings.local_files_root
        if root is None:
            raise ImageError("local image paths need LOCAL_FILES_DOCUMENT_ROOT", status=400)
        candidate = Path(unquote(rel))
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not path.is_relative_to(root):
            raise ImageError(f"image path {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT", status=403)
        if not path.is_file():
            raise ImageError(f"image path {rel!r} does not exist under LOCAL_FILES_DOCUMENT_ROOT", status=404)
        size = path.stat().st_size
        if size > self.settings.max_image_bytes:
            raise ImageError(f"image {rel!r}: {size} bytes, over the limit of {self.settings.max_image_bytes}",
                             status=413)
        return path.read_bytes()


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def safe_url(url: str) -> str:
    """The URL without its query string and user info (they may carry secrets)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}" if p.scheme else p.path


def _status_message(status: int, url: str, to_ls: bool, has_key: bool) -> str:
    if status in (401, 403) and to_ls:
        if not has_key:
            return (f"Label Studio answered {status} for {url}: set LABEL_STUDIO_API_KEY to a personal access token "
                    "(Account & Settings → Personal Access Token)")
        return (f"Label Studio answered {status} for {url}: LABEL_STUDIO_API_KEY was not accepted (a legacy token "
                "while legacy tokens are disabled? use a personal access token)")
    if status == 404:
        return f"image {url}: not found (HTTP 404)"
    return f"image {url}: HTTP {status}"
