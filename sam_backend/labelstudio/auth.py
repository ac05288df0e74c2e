"""Label Studio credentials: which kind of key, and the Authorization header for it.

A personal access token (a JWT, Label Studio ≥ 1.19) is a refresh token: it is exchanged at
`/api/token/refresh/` for a short-lived access token, sent as `Bearer`, and renewed 30 s before its
`exp`. A legacy token (40 hex characters) is sent as `Token` as it is. The key only ever goes to the
Label Studio address the caller names (the operator's `LABEL_STUDIO_URL`).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from urllib.parse import urljoin

import requests

from sam_backend.errors import ClientError

_REFRESH_MARGIN_S = 30.0


class LabelStudioError(ClientError):
    """Label Studio did not accept our credentials or did not answer (502: the fault is upstream)."""

    default_status = 502


def _jwt_expiry(token: str) -> float | None:
    """`exp` claim of a JWT (seconds since the epoch), read without verifying the signature."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def is_personal_access_token(key: str) -> bool:
    """Label Studio personal access tokens are JWTs (three dot-separated parts); legacy tokens are hex."""
    return key.count(".") == 2


def key_kind(key: str) -> str:
    """`personal access token`, `legacy token`, or a description of a key that is neither."""
    if is_personal_access_token(key):
        return "personal access token"
    if len(key) == 40 and all(c in "0123456789abcdef" for c in key.lower()):
        return "legacy token"
    return "token (neither a personal access token nor a legacy token)"


class LabelStudioAuth:
    """The Authorization header for Label Studio, renewing a personal access token's access token."""

    def __init__(self, api_key: str | None, session: requests.Session, timeout_s: float) -> None:
        self._key = api_key
        self._session = session
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._access: str | None = None
        self._expires = 0.0

    @property
    def configured(self) -> bool:
        return bool(self._key)

    def header(self, base_url: str) -> dict[str, str]:
        """`{"Authorization": ...}` for requests to `base_url`, or `{}` without a key."""
        if not self._key:
            return {}
        if not is_personal_access_token(self._key):
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or time.time() > self._expires - _REFRESH_MARGIN_S:
                self._refresh(base_url)
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access = None

    def _refresh(self, base_url: str) -> None:
        url = urljoin(base_url + "/", "api/token/refresh/")
        try:
            resp = self._session.post(url, json={"refresh": self._key}, timeout=self._timeout)
        except requests.RequestException as exc:
            raise LabelStudioError(f"Label Studio at {base_url} did not answer the token refresh "
                                   f"({exc.__class__.__name__})") from None
        if resp.status_code != 200:
            raise LabelStudioError(f"Label Studio refused LABEL_STUDIO_API_KEY at /api/token/refresh/ (HTTP "
                                   f"{resp.status_code}); create a new personal access token in Account & Settings")
        try:
            access = resp.json().get("access")
        except (ValueError, AttributeError):
            access = None
        if not isinstance(access, str):
            raise LabelStudioError("Label Studio's token refresh answered without an access token")
        self._access = access
        self._expires = _jwt_expiry(access) or time.time() + 240


