"""A local Label Studio: start it, log in, get a personal access token, and the REST calls we need.

Used by `sam-backend up` and by the integration tests. Label Studio runs as a subprocess bound to
127.0.0.1 with its own data dir, `ML_BLOCK_LOCAL_IP=false` and `SSRF_PROTECTION_ENABLED=false`
(the backend runs on loopback). Legacy API tokens stay disabled, as in a fresh 1.23 install;
every API call uses a personal access token.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

from sam_backend.images import LabelStudioAuth

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_studio_bin() -> str | None:
    """`LABEL_STUDIO_BIN`, else `.venv-ls/bin/label-studio` in the checkout, else PATH."""
    env = os.environ.get("LABEL_STUDIO_BIN")
    if env and Path(env).exists():
        return env
    local = Path(__file__).resolve().parents[1] / ".venv-ls" / "bin" / "label-studio"
    if local.exists():
        return str(local)
    return shutil.which("label-studio")


class LabelStudioClient:
    """Label Studio's REST API with a personal access token (renewed Bearer) or a legacy token."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.api = requests.Session()
        self.pat: str | None = None
        if api_key:
            self.use_token(api_key)

    def use_token(self, api_key: str) -> None:
        """Authenticate every later call with `api_key`."""
        self.pat = api_key
        auth = LabelStudioAuth(api_key, requests.Session(), 10.0)
        self.api.auth = lambda r: (r.headers.update(auth.header(self.url)), r)[1]

    def legacy_token(self) -> str:
        r = self.api.get(self.url + "/api/current-user/token", timeout=10)
        r.raise_for_status()
        return r.json()["token"]

    # -- REST helpers -------------------------------------------------------------------------
    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        """One request; raises RuntimeError naming the call and the status on HTTP >= 400."""
        r = self.api.request(method, self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)
        if r.status_code >= 400:
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

    def tasks(self, project: int) -> list[dict]:
        r = self.call("GET", "/api/tasks/", params={"project": project, "page_size": 100_000})
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

    def interactive(self, ml_id: int, task_id: int, result: list[dict]) -> dict:
        return self.call("POST", f"/api/ml/{ml_id}/interactive-annotating",
                         json={"task": task_id, "context": {"result": result}}).json()


class LabelStudio(LabelStudioClient):
    """A Label Studio process on 127.0.0.1 that this program starts and stops."""

    def __init__(self, data_dir: Path, email: str, password: str, port: int | None = None,
                 log_path: Path | None = None) -> None:
        self.port = port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.data_dir = data_dir
        self.email = email
        self.password = password
        self.log_path = log_path or data_dir / "label-studio.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0, pat: str | None = None) -> LabelStudio:
        """Start the server, wait for /health, and authenticate with `pat` (else a new token)."""
        binary = label_studio_bin()
        if binary is None:
            raise RuntimeError("label-studio is not installed: `make up` or `make test` install it into .venv-ls")
        env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir), ML_BLOCK_LOCAL_IP="false",
                   SSRF_PROTECTION_ENABLED="false", LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
                   SENTRY_DSN="", FRONTEND_SENTRY_DSN="", COLLECT_ANALYTICS="false")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env["SECRET_KEY"] = self._secret_key()
        out = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            [binary, "start", "--no-browser", "--internal-host", "127.0.0.1", "--host", self.url,
             "--port", str(self.port), "--data-dir", str(self.data_dir),
             # "--opt=value": a generated password may begin with "-", which argparse takes for an option
             f"--username={self.email}", f"--password={self.password}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"Label Studio did not answer /health in {timeout_s:.0f} s; see {self.log_path}")
        self.use_token(pat or self.create_personal_access_token())
        return self

    def _secret_key(self) -> str:
        """Django's SECRET_KEY (it signs the personal access tokens), made once and kept in the data dir.

        Left to itself, Label Studio writes a random key into `<data dir>/.env` on first start, and its
        processes can race to write two: after a restart the saved token then fails signature checks.
        """
        path = self.data_dir / ".sam-backend-secret-key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(50))
        return path.read_text().strip()

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 20 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def login(self) -> requests.Session:
        """A browser-like session (cookies + CSRF) logged in as the admin."""
        s = requests.Session()
        s.get(self.url + "/user/login/", timeout=10)
        r = s.post(self.url + "/user/login/", data={"email": self.email, "password": self.password,
                                                     "csrfmiddlewaretoken": s.cookies.get("csrftoken")},
                   headers={"Referer": self.url + "/user/login/"}, allow_redirects=False, timeout=10)
        if r.status_code != 302:
            raise RuntimeError(f"login failed: HTTP {r.status_code}")
        return s

    def create_personal_access_token(self) -> str:
        s = self.login()
        headers = {"X-CSRFToken": s.cookies.get("csrftoken"), "Referer": self.url}
        r = s.post(self.url + "/api/token/", headers=headers, timeout=10)
        if r.status_code == 201:
            return r.json()["token"]
        if r.status_code == 409:
            raise RuntimeError("this user already has a personal access token and Label Studio shows it only once; "
                               "revoke it in Account & Settings or pass the saved one")
        raise RuntimeError(f"could not create a personal access token: HTTP {r.status_code} {r.text[:200]}")
