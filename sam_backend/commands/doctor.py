"""`sam-backend doctor`: check the setup from the user's side, one line per check, each OK or the fix."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import requests

from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.labelstudio.auth import key_kind
from sam_backend.labelstudio.client import LabelStudioClient
from sam_backend.labelstudio.images import ImageFetcher
from sam_backend.labelstudio.labelconfig import task_image_url


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # works, but something will hurt (still ok: the exit status stays 0)

    def line(self) -> str:
        state = "FAIL" if not self.ok else ("WARN" if self.warning else "OK  ")
        return f"{state}  {self.name}: {self.detail}"


def run_checks(settings: Settings, project: int | None = None,
               engine_loader: Callable[[], object] | None = None) -> Iterator[Check]:
    """Yield checks in order; later checks are skipped where an earlier one makes them meaningless."""
    base = settings.label_studio_url
    ls_ok = False
    if not base:
        yield Check("Label Studio", False, "LABEL_STUDIO_URL is not set; set it to the address the backend can reach "
                                           "Label Studio at, e.g. http://127.0.0.1:8080")
    else:
        try:
            r = requests.get(base + "/health", timeout=5)
            ls_ok = r.status_code == 200
            yield Check("Label Studio", ls_ok, f"{base} answers /health" if ls_ok else
                        f"{base}/health answered HTTP {r.status_code}; is this Label Studio's address?")
        except requests.RequestException as exc:
            yield Check("Label Studio", False, f"cannot reach {base} ({exc.__class__.__name__}); start Label Studio "
                                               "or fix LABEL_STUDIO_URL")
    token_ok = False
    client = None
    if ls_ok:
        key = settings.label_studio_api_key
        if not key:
            yield Check("API key", False, "LABEL_STUDIO_API_KEY is not set; create a personal access token in Label "
                                          "Studio (Account & Settings → Personal Access Token) and set it")
        else:
            kind = key_kind(key)
            client = LabelStudioClient(base, key)
            try:
                r = client.whoami()
                token_ok = r.status_code == 200
                detail = (f"{kind} accepted (user {r.json().get('email', '?')})" if token_ok else
                          f"{kind} refused with HTTP {r.status_code}" + (
                              "; legacy tokens are disabled by default since 1.23: use a personal access token"
                              if kind == "legacy token" else "; create a new personal access token"))
                yield Check("API key", token_ok, detail)
            except ClientError as exc:
                yield Check("API key", False, exc.message)
            except requests.RequestException as exc:
                yield Check("API key", False, f"request failed ({exc.__class__.__name__})")
    if project is not None and token_ok and client is not None:
        yield _image_check(client, ImageFetcher(settings), project)
    yield from _engine_checks(settings, engine_loader)


def _image_check(client: LabelStudioClient, fetcher: ImageFetcher, project: int) -> Check:
    try:
        tasks = client.tasks(project, page_size=1)
        url = task_image_url(tasks[0]) if tasks else None
        if url is None:
            return Check("task image", False, f"project {project} has no task with an image URL to try")
        t0 = time.perf_counter()
        loaded = fetcher.load(url)
        return Check("task image", True, f"task {tasks[0]['id']}: {loaded.size[0]}x{loaded.size[1]} downloaded and "
                                         f"decoded in {time.perf_counter() - t0:.2f} s")
    except ClientError as exc:
        return Check("task image", False, exc.message)
    except (RuntimeError, requests.RequestException, ValueError, KeyError) as exc:
        return Check("task image", False, f"could not list tasks of project {project} ({exc.__class__.__name__})")


def _engine_checks(settings: Settings, engine_loader: Callable[[], object] | None) -> Iterator[Check]:
    from sam_backend.segment.checkpoints import ChecksumError, expected_sha256, verify_checkpoint
    from sam_backend.segment.engines import EngineError
    from sam_backend.segment.engines.factory import make_engine

    if settings.engine == "sam":
        path = settings.checkpoint_path
        if not path.is_file():
            yield Check("checkpoint", False, f"{path} is missing; run `sam-backend download {settings.model_type}` "
                                             "(or set SAM_ENGINE=grabcut to label without weights)")
            return
        expected = expected_sha256(settings)
        if expected is None:
            yield Check("checkpoint", True, f"{path} present; no SHA-256 known (set SAM_CHECKPOINT_SHA256 to verify)")
        else:
            try:
                verify_checkpoint(path, expected, progress=True)
                yield Check("checkpoint", True, f"{path} verified (sha256 {expected[:12]}…)")
            except ChecksumError as exc:
                yield Check("checkpoint", False, str(exc))
                return
    try:
        t0 = time.perf_counter()
        engine = (engine_loader or (lambda: make_engine(settings)))()
        loaded = time.perf_counter() - t0
        from sam_backend.segment.samples import bench_image, bench_prompts

        image = bench_image(1024, 768)
        t0 = time.perf_counter()
        embedding = engine.embed(image)
        encode_s = time.perf_counter() - t0
        engine.predict(embedding, bench_prompts(1024, 768)[0])
        detail = (f"{engine.engine_id} loaded in {loaded:.1f} s and segmented a test image "
                  f"(encode of 1024x768: {encode_s:.1f} s)")
        budget = label_studio_timeout_s() / 2
        if encode_s > budget:
            yield Check("engine", True, detail + f". WARNING: more than half of Label Studio's {2 * budget:.0f} s "
                        f"timeout (ML_TIMEOUT_PREDICT): a click on a new image may be answered 'still encoding'. "
                        f"{faster_choice(settings)}", warning=True)
        else:
            yield Check("engine", True, detail)
    except EngineError as exc:
        yield Check("engine", False, str(exc))


def label_studio_timeout_s() -> float:
    """How long Label Studio waits for `/predict` (its `ML_TIMEOUT_PREDICT`, 100 s by default)."""
    try:
        return float(os.environ.get("ML_TIMEOUT_PREDICT", "100"))
    except ValueError:
        return 100.0


def faster_choice(settings: Settings) -> str:
    """What to use instead of a model too slow for this machine."""
    if settings.engine == "sam" and settings.model_type != "vit_t":
        return ("Use SAM_MODEL_TYPE=vit_t (MobileSAM: about 8x faster to encode than vit_b on a CPU; "
                "`sam-backend download vit_t`) or run the backend on a GPU (SAM_DEVICE=cuda).")
    return "Run the backend on a GPU (SAM_DEVICE=cuda), or precompute the project's images (sam-backend precompute)."
