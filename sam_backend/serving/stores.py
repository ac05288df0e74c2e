"""The shared embedding tier behind the in-process cache (`SAM_EMBEDDING_STORE`).

The in-process LRU (`serving.cache`) stays the first tier. A second one, shared by every worker and replica
that names the same store, keeps embeddings as bytes (`Engine.dump(compact=True)`: float16 features with a
crc32, never pickle) under `emb:<engine id>:<image sha256>`, and the image digest of a URL under
`url:<engine id>:<sha256 of the URL>`, so a click on another worker neither fetches nor encodes again:

- `redis://host:6379/0`: Redis. Size is Redis's own `maxmemory` with an LRU policy. One encode per image:
  the worker that misses takes `lock:<key>` with `SET NX PX` and encodes; the others wait for the value;
  the lock of a worker that died expires.
- `file:///path`: a directory (local disk or a shared volume) with a byte cap (`SAM_EMBEDDING_STORE_MB`) and
  least-recently-used eviction by modification time (a read touches the file). Writes go to a temporary file
  and are renamed into place; the lock is a file created with `O_EXCL` that expires by its age.

A store that cannot be reached never fails a click: reads miss, writes are skipped, a warning is logged once
per outage and `/metrics` counts the errors (`sam_store_errors_total`); sharing resumes when it is back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from sam_backend.fileio import write_atomic

log = logging.getLogger(__name__)

LOCK_TTL_S = 120.0  # longer than any encode; a dead worker's lock is gone after this
POLL_S = 0.05
RESCAN_S = 10.0  # a directory store looks at what other processes wrote at least this often


class StoreError(RuntimeError):
    """The store's address cannot be used (a bad `SAM_EMBEDDING_STORE`)."""


class SharedStore(Protocol):
    """Bytes by key, shared by processes, with a short-lived lock per key."""

    kind: str

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None: ...

    def delete(self, key: str) -> None: ...

    def claim(self, key: str, ttl_s: float = LOCK_TTL_S) -> bool:
        """True when this process took the lock of `key` (it should compute the value)."""
        ...

    def release(self, key: str) -> None: ...


class Outage:
    """Counts a store's failures and logs the first of each outage (and its end) once."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.errors = 0
        self.down = False
        self._lock = threading.Lock()

    def failed(self, action: str, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            first, self.down = not self.down, True
        if first:
            log.warning("embedding store (%s) unavailable on %s (%s: %s); clicks go on with this process's cache",
                        self.kind, action, type(exc).__name__, str(exc)[:200])

    def ok(self) -> None:
        if self.down:
            with self._lock:
                back, self.down = self.down, False
            if back:
                log.warning("embedding store (%s) is back: sharing resumes", self.kind)


class RedisStore:
    """Embeddings in Redis (`redis://host:port/db`); see the module docstring."""

    kind = "redis"

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._tokens: dict[str, str] = {}
        self.outage = Outage(self.kind)

    def get(self, key: str) -> bytes | None:
        try:
            value = self._redis.get(key)
        except Exception as exc:  # connection refused, timeout, a Redis restarting
            self.outage.failed("read", exc)
            return None
        self.outage.ok()
        return value

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        try:
            self._redis.set(key, data, px=int(ttl_s * 1000) if ttl_s else None)
        except Exception as exc:
            self.outage.failed("write", exc)
            return
        self.outage.ok()

    def delete(self, key: str) -> None:
        try:
            self._redis.delete(key)
        except Exception as exc:
            self.outage.failed("delete", exc)

    def claim(self, key: str, ttl_s: float = LOCK_TTL_S) -> bool:
        token = secrets.token_hex(8)
        try:
            taken = bool(self._redis.set(f"lock:{key}", token, nx=True, px=int(ttl_s * 1000)))
        except Exception as exc:
            self.outage.failed("lock", exc)
            return True  # no store: compute here
        if taken:
            self._tokens[key] = token
        return taken

    def release(self, key: str) -> None:
        token = self._tokens.pop(key, None)
        if token is None:
            return
        try:  # only our own lock: a lock that expired and was taken by another worker stays
            self._redis.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
                             "end return 0", 1, f"lock:{key}", token)
        except Exception as exc:
            self.outage.failed("unlock", exc)


class DirectoryStore:
    """Embeddings as files under a directory, capped at `max_bytes` with LRU eviction; see the module docstring."""

    kind = "file"

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.outage = Outage(self.kind)
        self._evict_lock = threading.Lock()
        self._owned: set[str] = set()  # locks this process took (only those are released)
        # What the directory holds, as of the last scan plus this process's writes since: the directory is
        # scanned (and evicted) only when that may pass the cap, or when another process's writes may have.
        self._bytes = 0
        self._scanned = 0.0

    def _path(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode()).hexdigest() + ".bin")

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.outage.failed("read", exc)
            return None
        return data

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Store `data` (`ttl_s` is not kept: readers of short-lived values check their age themselves)."""
        try:
            write_atomic(self._path(key), data)
        except OSError as exc:
            self.outage.failed("write", exc)
            return
        self._bytes += len(data)
        if self._bytes > self.max_bytes or time.monotonic() - self._scanned > RESCAN_S:
            self._evict()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _evict(self) -> None:
        """Remove least recently used files until the directory holds at most `max_bytes`."""
        with self._evict_lock:
            files = []
            for entry in os.scandir(self.root):
                if entry.name.endswith(".bin"):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime_ns, st.st_size, entry.path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                Path(path).unlink(missing_ok=True)
                total -= size
            self._bytes, self._scanned = total, time.monotonic()

    def claim(self, key: str, ttl_s: float = LOCK_TTL_S) -> bool:
        lock = self._path(key).with_suffix(".lock")
        for _ in range(2):
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                self._owned.add(key)
                return True
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime < ttl_s:
                        return False
                    lock.unlink(missing_ok=True)  # left by a worker that died
                except FileNotFoundError:
                    continue
            except OSError as exc:
                self.outage.failed("lock", exc)
                return True
        return False

    def release(self, key: str) -> None:
        if key in self._owned:
            self._owned.discard(key)
            self._path(key).with_suffix(".lock").unlink(missing_ok=True)


def open_store(url: str | None, max_bytes: int) -> RedisStore | DirectoryStore | None:
    """The store `SAM_EMBEDDING_STORE` names: `redis://…`, `file:///path`, or None for none."""
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"SAM_EMBEDDING_STORE: expected file:///absolute/path, got {url!r}")
        return DirectoryStore(Path(unquote(parsed.path)), max_bytes)
    raise StoreError(f"SAM_EMBEDDING_STORE: expected redis://host:6379/0 or file:///path, got {url!r}")


def embedding_key(engine_id: str, image_sha256: str) -> str:
    return f"emb:{engine_id}:{image_sha256}"


def url_key(engine_id: str, url: str) -> str:
    return f"url:{engine_id}:{hashlib.sha256(url.encode()).hexdigest()}"
