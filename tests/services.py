"""Real Redis, PostgreSQL and nginx (Debian packages) for the scale-out tests.

Each is started like Label Studio: on 127.0.0.1, a free port, a temporary data directory, in the foreground
as a child process, and stopped by its PID. None is a mock. Where a binary is missing, `require_or_skip`
skips (and fails under CI=true, where `make test` installs them).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import require_or_skip

from sam_backend.labelstudio.client import free_port
from sam_backend.labelstudio.process import stop_process


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 30.0, what: str = "service") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} in {timeout_s} s")


class Redis:
    """`redis-server` on 127.0.0.1 with no persistence and an LRU memory bound."""

    def __init__(self, data_dir: Path, maxmemory_mb: int = 256) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            require_or_skip("redis-server is not installed (apt-get install redis-server)")
        self.data_dir = Path(data_dir)
        self.maxmemory_mb = maxmemory_mb
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--save", "", "--appendonly", "no", "--maxmemory", f"{self.maxmemory_mb}mb",
             "--maxmemory-policy", "allkeys-lru", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, what="redis-server")
        return self

    def stop(self) -> None:
        stop_process(self.proc, grace_s=10)
        self.proc = None


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        require_or_skip(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return path


class Postgres:
    """A PostgreSQL cluster of its own: `initdb` into a temporary directory, `postgres` on 127.0.0.1 only
    (no Unix socket outside that directory), trust authentication for its one local user. As root it runs
    as the `postgres` user (PostgreSQL refuses root), which the Debian package creates."""

    def __init__(self, data_dir: Path) -> None:
        self.initdb, self.postgres = _pg_bin("initdb"), _pg_bin("postgres")
        self.root = Path(data_dir)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        # As root, the processes run as the `postgres` user (Popen's `user=`): the PID we hold is postgres's own.
        self._as: dict = {"user": "postgres", "group": "postgres"} if os.getuid() == 0 else {}
        self.user = "postgres" if os.getuid() == 0 else os.environ.get("USER", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def start(self) -> Postgres:
        data = self.root / "pgdata"
        if not data.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if os.getuid() == 0:
                shutil.chown(self.root, "postgres")
                os.chmod(self.root, 0o700)
                for parent in list(self.root.parents)[:3]:  # let the postgres user reach the directory
                    if str(parent).startswith(("/tmp", "/var/tmp")) and parent != Path("/tmp"):
                        os.chmod(parent, os.stat(parent).st_mode | 0o011)
            subprocess.run([self.initdb, "-D", str(data), "-U", self.user, "--auth=trust", "--no-sync", "-E", "UTF8"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root, **self._as)
        self.proc = subprocess.Popen(
            [self.postgres, "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.root), "-c", "fsync=off", "-c", "max_connections=100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root, **self._as)
        _wait_port(self.port, self.proc, what="postgres")
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop by PID (SIGTERM: PostgreSQL's smart shutdown waits for clients; SIGINT is its fast one)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class Nginx:
    """nginx in front of backend replicas on 127.0.0.1: health-checked upstreams (passive: `max_fails`) and
    `proxy_next_upstream` so that a request to a replica that died is retried on another."""

    def __init__(self, root: Path, upstreams: list[str]) -> None:
        self.binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if self.binary is None:
            require_or_skip("nginx is not installed (apt-get install nginx)")
        self.root = Path(root)
        self.upstreams = upstreams
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        """Render deploy/nginx.conf.template (the file compose uses) with this test's addresses."""
        from string import Template

        from conftest import ROOT

        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "nginx.conf"
        template = Template((ROOT / "deploy" / "nginx.conf.template").read_text())
        conf.write_text(template.safe_substitute(
            SAM_UPSTREAMS=" ".join(f"server {u} max_fails=1 fail_timeout=5s;" for u in self.upstreams),
            NGINX_LISTEN=f"127.0.0.1:{self.port}", NGINX_PREFIX=str(self.root),
            NGINX_USER="user root;" if os.getuid() == 0 else ""))
        self.proc = subprocess.Popen([self.binary, "-p", str(self.root), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, what="nginx")
        return self

    def stop(self) -> None:
        stop_process(self.proc, grace_s=10)
        self.proc = None
