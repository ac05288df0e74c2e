"""Label Studio's REST API, authenticated with a personal access token (renewed Bearer) or a legacy token.

The one client that `doctor`, `export --project`, `precompute`, `up` and the tests use; token
handling is `sam_backend.labelstudio.auth`'s.
"""

from __future__ import annotations

import socket
from typing import Any

import requests

from sam_backend.labelstudio.auth import LabelStudioAuth


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudioClient:
    """Label Studio's REST API with a personal access token (renewed Bearer) or a legacy token."""

    def __init__(self, url: str, api_key: str | None = None, session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.api = session or requests.Session()
        self.pat: str | None = None
        self.auth: LabelStudioAuth | None = None
        if api_key:
            self.use_token(api_key)

    def use_token(self, api_key: str) -> None:
        """Authenticate every later call with `api_key`."""
        self.pat = api_key
        self.auth = LabelStudioAuth(api_key, requests.Session(), 10.0)
        self.api.auth = self._authorize

    def _authorize(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.auth is not None:
            r.headers.update(self.auth.header(self.url))
        return r

    def legacy_token(self) -> str:
        r = self.api.get(self.url + "/api/current-user/token", timeout=10)
        r.raise_for_status()
        return r.json()["token"]

    # -- REST helpers -------------------------------------------------------------------------
    def call(self, method: str, path: str, *, check: bool = True, **kwargs: Any) -> requests.Response:
        """One request; with `check`, raises RuntimeError naming the call and the status on HTTP >= 400."""
        r = self.api.request(method, self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)
        if check and r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r

    def create_project(self, title: str, label_config: str) -> int:
        return self.call("POST", "/api/projects/", json={"title": title, "label_config": label_config}).json()["id"]

    def upload(self, project: int, files: dict[str, bytes]) -> list[int]:
        """Upload image files; returns the new task ids in upload order."""
        before = {t["id"] for t in self.tasks(project)}
        # One field name per file: Label Studio keeps only one file per field name.
        multipart = [(f"file{i}", (name, data, "application/octet-stream"))
                     for i, (name, data) in enumerate(files.items())]
        self.call("POST", f"/api/projects/{project}/import", files=multipart)
        return sorted(t["id"] for t in self.tasks(project) if t["id"] not in before)

    def project(self, project: int) -> dict:
        return self.call("GET", f"/api/projects/{project}/").json()

    def whoami(self) -> requests.Response:
        """`/api/current-user/whoami`, unchecked: the caller reads the status (is the token accepted?)."""
        return self.call("GET", "/api/current-user/whoami", check=False, timeout=10)

    def tasks(self, project: int, page_size: int = 100_000, fields: str | None = None) -> list[dict]:
        """A project's tasks; `fields="all"` includes their annotations and predictions (the default is data only)."""
        params: dict[str, Any] = {"project": project, "page_size": page_size}
        if fields:
            params["fields"] = fields
        r = self.call("GET", "/api/tasks/", params=params)
        data = r.json()
        return data["tasks"] if isinstance(data, dict) else data

    def task(self, task_id: int) -> dict:
        return self.call("GET", f"/api/tasks/{task_id}/").json()

    def projects(self) -> list[dict]:
        data = self.call("GET", "/api/projects/", params={"page_size": 1000}).json()
        return data["results"] if isinstance(data, dict) else data

    def ml_backends(self, project: int) -> list[dict]:
        return self.call("GET", "/api/ml/", params={"project": project}).json()

    def add_ml_backend(self, project: int, url: str, interactive: bool = True, **extra) -> int:
        body = {"url": url, "project": project, "is_interactive": interactive, "title": "sam-backend", **extra}
        return self.call("POST", "/api/ml/", json=body).json()["id"]

    def register_webhook(self, project: int, backend_url: str, secret: str | None) -> int:
        """Make the project's webhook to `<backend_url>/webhook` (the one Label Studio creates when the backend is
        connected, else a new one) carry `X-SAM-Webhook-Secret: <secret>`; returns its id."""
        url = backend_url.rstrip("/") + "/webhook"
        found = self.call("GET", "/api/webhooks/", params={"project": project}).json()
        hooks = found["results"] if isinstance(found, dict) else found
        headers = {"X-SAM-Webhook-Secret": secret} if secret else {}
        for hook in hooks:
            if hook.get("url") == url and hook.get("project") == project:
                self.call("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": headers})
                return int(hook["id"])
        created = self.call("POST", "/api/webhooks/", json={
            "project": project, "url": url, "send_payload": True, "send_for_all_actions": True, "headers": headers,
            "is_active": True})
        return int(created.json()["id"])

    def interactive(self, ml_id: int, task_id: int, result: list[dict]) -> dict:
        return self.call("POST", f"/api/ml/{ml_id}/interactive-annotating",
                         json={"task": task_id, "context": {"result": result}}).json()


