"""Flask app speaking Label Studio's ML backend protocol.

Endpoints: `GET /` and `/health` (never wait for the model; with BASIC_AUTH set and no credentials, only whether it
is up: per-project learning, paths and errors need the credentials), `POST /setup` (parses the config,
never loads the model), `POST /predict`, `POST /webhook`, `GET /versions`, `GET /metrics`.
Errors answer `{"errors": [message]}` with a fitting status and never carry a traceback; an
unexpected exception is logged with an id that the response repeats.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from sam_backend.config import Settings
from sam_backend.errors import ClientError
from sam_backend.segment.engines import EngineError
from sam_backend.segment.prompts import PromptError
from sam_backend.serving.backend import RequestError, SamBackend
from sam_backend.serving.stages import StageTimes
from sam_backend.sidecar.records import Interaction

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{8,128}")  # nginx's $request_id is 32 hex digits
_KNOWN = {"/", "/health", "/setup", "/predict", "/webhook", "/versions", "/metrics"}


class RedactSecrets(logging.Filter):
    """Masks API keys, passwords and Authorization/Bearer/Token values in every log record."""

    _pattern = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?|bearer\s+|token\s+|refresh[\"']?\s*[:=]\s*[\"']?)"
                          r"[A-Za-z0-9._\-+/=]{8,}")

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = self._pattern.sub(lambda m: m.group(1) + "<redacted>", text)
        for secret in self.secrets:
            clean = clean.replace(secret, "<redacted>")
        if clean != text:
            record.msg, record.args = clean, None
        return True


def install_redaction(settings: Settings) -> None:
    """Attach `RedactSecrets` to every root handler (call after logging is configured)."""
    from urllib.parse import urlparse

    url_passwords = [urlparse(str(u)).password or "" for u in (settings.metadata_db, settings.embedding_store) if u]
    flt = RedactSecrets([settings.label_studio_api_key or "", settings.basic_auth_pass or "", *url_passwords])
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)


class FastJSON(DefaultJSONProvider):
    """Response bodies written by orjson. A brush result is a list of up to a few hundred thousand small ints:
    the standard json module wrote one noisy 1024 × 768 mask in 13-22 ms, orjson in 1-1.5 ms (measured side by
    side). Request bodies are still read by Flask's default."""

    _options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, default=self.default, option=self._options).decode()

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj, default=self.default, option=self._options),
                                        mimetype=self.mimetype)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def _error(message: str, status: int) -> Response:
    """`{"errors": [message]}` with the message also as the HTTP reason phrase: Label Studio drops the
    body of a non-200 answer and shows only `str(HTTPError)`, which carries the reason phrase."""
    resp = jsonify({"errors": [message], "status": status})
    reason = "".join(c if 32 <= ord(c) < 127 else "?" for c in message)[:400]
    resp.status = f"{status} {reason}"
    return resp


def create_app(settings: Settings | None = None, backend: SamBackend | None = None,
               recorder: Callable[[Interaction], None] | None = None, start: bool = True) -> Flask:
    """Build the app; `start` loads the engine and starts the precompute worker in the background.

    Without `backend`, one is built from `settings`, recording interactions in `SAM_METADATA_DB`. The routes come
    in three groups, each registered by its own function: the click path (`/predict`), Label Studio's lifecycle
    (`/setup`, `/webhook`, `/versions`) and operations (`/`, `/health`, `/metrics`); `_guard` authenticates and
    measures every request, `_errors` maps every exception to `{"errors": [...]}`.
    """
    settings = settings or Settings.from_env()
    if backend is None:
        backend = SamBackend(settings, recorder=recorder or _recorder(settings))
    if start:
        backend.start()
    app = Flask("sam_backend")
    app.json = FastJSON(app)
    app.config["MAX_CONTENT_LENGTH"] = 32 * 1024 * 1024
    app.extensions["sam_backend"] = backend
    _guard(app, settings, backend)
    _click_path(app, backend)
    _label_studio_lifecycle(app, settings, backend)
    _operations(app, backend)
    _errors(app)
    return app


def _recorder(settings: Settings) -> Callable[[Interaction], Any]:
    """The sidecar writer `SAM_METADATA_DB` names. With PostgreSQL (replicas that may be killed at any time), a
    click's rows are written before its answer leaves: the write runs alongside RLE and JSON, and the answer waits
    for the rest (about 5 ms for a noisy ViT-B mask, measured), never while the database is down. One SQLite
    process does not wait: the default click path stays as fast as it was."""
    from sam_backend.sidecar.store import AsyncRecorder, open_sidecar

    shared = "://" in str(settings.metadata_db)
    return AsyncRecorder(open_sidecar(settings.metadata_db), confirm_s=0.25 if shared else 0.0)


def _basic_auth_ok(header: str, settings: Settings) -> bool:
    """Whether an `Authorization: Basic …` header carries `BASIC_AUTH_USER` / `BASIC_AUTH_PASS` (constant time)."""
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user.encode(), settings.basic_auth_user.encode()) & hmac.compare_digest(
        password.encode(), (settings.basic_auth_pass or "").encode())


def _guard(app: Flask, settings: Settings, backend: SamBackend) -> None:
    """HTTP Basic auth where `BASIC_AUTH_USER` is set (a GET of `/` or `/health` without credentials is let through
    to a short answer), and every request counted and timed for `/metrics`."""

    @app.before_request
    def _auth() -> Any:
        g.t0 = time.perf_counter()
        g.authenticated = True
        if settings.basic_auth_user is None:
            return None
        header = request.headers.get("Authorization", "")
        if not header and request.method == "GET" and request.path in ("/", "/health"):
            g.authenticated = False  # a health check without credentials: up or not, no detail (see `health`)
            return None
        if not _basic_auth_ok(header, settings):
            resp = _error("authentication required: this backend expects HTTP Basic credentials", 401)
            resp.headers["WWW-Authenticate"] = 'Basic realm="sam-backend"'
            return resp
        return None

    @app.after_request
    def _observe(resp: Response) -> Response:
        endpoint = request.path if request.path in _KNOWN else "other"
        backend.metrics.requests.labels(endpoint, str(resp.status_code)).inc()
        backend.metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return resp


def _json_body() -> dict[str, Any]:
    """The request's JSON object; `RequestError` (400) says what arrived instead."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise RequestError(f"expected a JSON object body (Content-Type: application/json), got "
                           f"{request.content_type or 'no content type'} with {request.content_length or 0} bytes")
    return body


def _click_path(app: Flask, backend: SamBackend) -> None:
    """`POST /predict`: a click's (or a task opened's) answer, its stages in `Server-Timing` and `/metrics`."""

    @app.post("/predict")
    def predict() -> Response:
        stages = StageTimes()
        request_id = request.headers.get("X-Request-ID", "")
        written: list = []
        answer = backend.predict(_json_body(), stages, request_id if _REQUEST_ID.fullmatch(request_id) else None,
                                 written)
        if not stages.seconds:  # a task opened: nothing was segmented
            return jsonify(answer)
        with stages.stage("json"):
            resp = jsonify(answer)
        confirm = getattr(backend.recorder, "confirm", None)
        events = [e for e in written if e is not None]
        if confirm is not None and events:
            with stages.stage("sidecar"):  # the rows' writes ran alongside the RLE and JSON above
                confirm(events)
        backend.metrics.observe_stages(stages.seconds)
        resp.headers["Server-Timing"] = stages.header()
        return resp


def _label_studio_lifecycle(app: Flask, settings: Settings, backend: SamBackend) -> None:
    """What Label Studio calls besides clicks: `/setup` (connecting the model), `/webhook` (annotations saved, for
    `SAM_ADAPT`; `X-SAM-Webhook-Secret` checked where `SAM_WEBHOOK_SECRET` is set) and `/versions`."""

    @app.post("/setup")
    def setup() -> Response:
        return jsonify(backend.setup(_json_body()))

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_body()
        action = body.get("action")
        log.debug("webhook %s", action)
        if action == "START_TRAINING":
            message = ("this backend learns from accepted masks as they are saved (SAM_ADAPT=true), not on request"
                       if backend.adapters.enabled else "this backend does not train; SAM is used as released "
                       "(SAM_ADAPT=true learns from accepted masks)")
            return jsonify({"status": "ignored", "action": action, "message": message})
        secret = settings.webhook_secret
        if secret is not None and backend.adapters.enabled:
            given = request.headers.get("X-SAM-Webhook-Secret", "")
            if not hmac.compare_digest(given.encode(), secret.encode()):
                message = (f"webhook {str(action)[:40]!r}: expected the X-SAM-Webhook-Secret header that "
                           f"SAM_WEBHOOK_SECRET sets, got {'a wrong one' if given else 'none'}; not learnt from")
                backend.adapters.refuse(message)
                return _error(message, 401)
        return jsonify({"status": "ok", "action": action, **backend.adapters.webhook(body)})

    @app.get("/versions")
    def versions() -> Response:
        return jsonify({"versions": [backend.model_version, *backend.adapters.all_versions(backend.model_version)],
                        "model_version": backend.model_version})


def _operations(app: Flask, backend: SamBackend) -> None:
    """What operators and their tools read: `/` and `/health` (state; without credentials where Basic auth is on,
    only whether it is up) and `/metrics` (Prometheus)."""

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        if not g.get("authenticated", True):  # BASIC_AUTH set, no credentials: whether it is up, nothing more
            return jsonify({"status": "UP", "model_class": "SamBackend", "model": backend.engine.state,
                            "engine_ready": backend.engine.ready, "adapt": {"enabled": backend.adapters.enabled}})
        return jsonify({"status": "UP", "model_class": "SamBackend", "model_version": backend.model_version,
                        "model": backend.engine.state, "model_load_s_left": _rounded(backend.engine.seconds_left()),
                        "model_load_s": _rounded(backend.engine.load_s), "ready_s": _rounded(backend.engine.ready_s),
                        "model_stage": backend.engine.stage,
                        "engine_ready": backend.engine.ready, "engine_error": backend.engine.error,
                        "decoder": backend.engine.decoder_kind, "encoder": backend.engine.encoder_kind,
                        "store": None if backend.store is None else {"kind": backend.store.kind,
                                                                      "up": not backend.store.outage.down},
                        "precompute_pending": backend.prewarm.pending, "adapt": backend.adapters.status(),
                        "cache_entries": backend.cache.stats().entries})

    @app.get("/metrics")
    def metrics() -> Response:
        if backend.engine.decoder_kind is not None:
            backend.metrics.decoder_kind.labels(backend.engine.decoder_kind).set(1)
        encoder = backend.engine.encoder_kind
        if encoder is not None:
            for kind in ("eager", "onnx", "aoti", "measuring"):
                backend.metrics.encoder_kind.labels(kind).set(1 if kind == encoder else 0)
        backend.metrics.model_ready.set(1 if backend.engine.ready else 0)
        return Response(backend.metrics.render(), mimetype="text/plain; version=0.0.4")


def _errors(app: Flask) -> None:
    """Every error as `{"errors": [message]}` with a fitting status; never a traceback in a response."""

    @app.errorhandler(ClientError)
    def _known(exc: ClientError) -> Response:
        log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return _error(exc.message, exc.status)

    @app.errorhandler(PromptError)
    def _prompt(exc: PromptError) -> Response:
        log.warning("bad prompt: %s", exc)
        return _error(f"prompt: {exc}", 422)

    @app.errorhandler(EngineError)
    def _engine(exc: EngineError) -> Response:
        return _error(str(exc), 503)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return _error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        error_id = uuid.uuid4().hex[:12]
        log.exception("unexpected error %s on %s %s", error_id, request.method, request.path)
        return _error(f"internal error {error_id}: the request failed; the backend log has the details", 500)
