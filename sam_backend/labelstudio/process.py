"""A local Label Studio process: start it, log in, get a personal access token, stop it.

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
import subprocess
import time
from pathlib import Path

import requests

from sam_backend.labelstudio.client import LabelStudioClient, free_port

log = logging.getLogger(__name__)


def label_studio_bin() -> str | None:
    """`LABEL_STUDIO_BIN`, else `.venv-ls/bin/label-studio` in the checkout, else PATH."""
    env = os.environ.get("LABEL_STUDIO_BIN")
    if env and Path(env).exists():
        return env
    local = Path(__file__).resolve().parents[2] / ".venv-ls" / "bin" / "label-studio"
    if local.exists():
        return str(local)
    return shutil.which("label-studio")


def wait_for_health(url: str, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.3) -> None:
    """Wait until `url` answers 200; `RuntimeError` if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{Path(str(proc.args[0])).name} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    """SIGTERM a child process, then SIGKILL if it has not exited after `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


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
        try:
            wait_for_health(self.url + "/health", self.proc, timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"Label Studio: {exc}; see {self.log_path}") from None
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
        stop_process(self.proc)

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
