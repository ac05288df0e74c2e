"""`sam-backend download` against a local HTTP server: progress, resume, bad digest."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from sam_backend.commands.cli import main
from sam_backend.segment.checkpoints import CHECKPOINTS, ChecksumError, DownloadError, download_checkpoint

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; `cut_after` bytes then a dropped connection, once."""

    cut_after: int | None = None
    ranges: list = []
    mode = "range"  # "range", "ignore-range" (always 200, whole body) or "416" (Range not satisfiable)

    def do_GET(self):  # noqa: N802
        start = 0
        rng = self.headers.get("Range")
        Handler.ranges.append(rng)
        if rng and Handler.mode == "416":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rng and Handler.mode == "range":
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if Handler.cut_after is not None:
            n, Handler.cut_after = Handler.cut_after, None
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    Handler.cut_after, Handler.ranges, Handler.mode = None, [], "range"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/sam_vit_b_01ec64.pth"
    httpd.shutdown()


def spec_for(url, digest=DIGEST):
    return replace(CHECKPOINTS["vit_b"], url=url, sha256=digest, size=len(PAYLOAD))


def test_download_verifies_and_shows_progress(server, tmp_path, capsys):
    path = download_checkpoint(spec_for(server), tmp_path, progress=True)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / (path.name + ".part")).exists()
    err = capsys.readouterr().err
    assert "sam_vit_b_01ec64.pth" in err and "100%" in err


def test_download_resumes_after_a_cut(server, tmp_path):
    Handler.cut_after = 300_000
    with pytest.raises(DownloadError, match="resume"):
        download_checkpoint(spec_for(server), tmp_path, progress=False)
    part = tmp_path / "sam_vit_b_01ec64.pth.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)
    have = part.stat().st_size
    path = download_checkpoint(spec_for(server), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert Handler.ranges[-1] == f"bytes={have}-"


def test_a_server_that_ignores_range_gets_the_whole_file_again(server, tmp_path):
    Handler.mode = "ignore-range"
    part = tmp_path / "sam_vit_b_01ec64.pth.part"
    part.write_bytes(b"\xff" * 300_000)  # a stale partial file that must not be kept in front
    path = download_checkpoint(spec_for(server), tmp_path, progress=False)
    assert Handler.ranges == ["bytes=300000-"] and path.read_bytes() == PAYLOAD


def test_416_on_a_complete_partial_file_verifies_it_without_downloading(server, tmp_path):
    Handler.mode = "416"
    (tmp_path / "sam_vit_b_01ec64.pth.part").write_bytes(PAYLOAD)
    path = download_checkpoint(spec_for(server), tmp_path, progress=False)
    assert Handler.ranges == [f"bytes={len(PAYLOAD)}-"] and path.read_bytes() == PAYLOAD


def test_416_on_a_wrong_partial_file_removes_it(server, tmp_path):
    Handler.mode = "416"
    (tmp_path / "sam_vit_b_01ec64.pth.part").write_bytes(b"\x00" * len(PAYLOAD))
    with pytest.raises(ChecksumError, match="partial file was removed"):
        download_checkpoint(spec_for(server), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_digest_removes_the_file_and_says_so(server, tmp_path):
    with pytest.raises(ChecksumError, match="partial file was removed"):
        download_checkpoint(spec_for(server, "f" * 64), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_download_with_mirror(server, tmp_path):
    result = CliRunner().invoke(main, ["download", "vit_b", "--dest", str(tmp_path), "--url", server,
                                       "--sha256", DIGEST, "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sam_vit_b_01ec64.pth").read_bytes() == PAYLOAD
    # Second run: already verified, nothing fetched.
    before = len(Handler.ranges)
    assert CliRunner().invoke(main, ["download", "vit_b", "--dest", str(tmp_path), "--url", server,
                                     "--sha256", DIGEST, "--quiet"]).exit_code == 0
    assert len(Handler.ranges) == before


def test_cli_download_bad_digest_exit_code(server, tmp_path):
    result = CliRunner().invoke(main, ["download", "vit_b", "--dest", str(tmp_path), "--url", server,
                                       "--sha256", "0" * 64, "--quiet"])
    assert result.exit_code == 1 and "SHA-256" in result.output


def test_known_digests_are_in_the_checkpoint_readme():
    from conftest import ROOT

    readme = (ROOT / "checkpoints" / "README.md").read_text()
    for spec in CHECKPOINTS.values():
        assert spec.filename in readme and spec.url in readme
        if spec.sha256:
            assert spec.sha256 in readme
    assert "Meta publishes no SHA-256" in readme


# -- SAM 2.1: no published digest ----------------------------------------------------------------------

def sam2_spec(url, approx=None):
    return replace(CHECKPOINTS["sam2.1_hiera_tiny"], url=url, approx_size=approx or len(PAYLOAD))


def test_sam2_specs_have_no_digest_and_the_official_urls():
    for size in ("tiny", "small", "base_plus", "large"):
        spec = CHECKPOINTS[f"sam2.1_hiera_{size}"]
        assert spec.sha256 is None and spec.approx_size > 100 * 2**20
        assert spec.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{size}.pt"


def test_sam2_download_checks_size_and_load_and_records_the_digest(server, tmp_path):
    from sam_backend.segment.checkpoints import recorded_sha256

    checked = []
    path = download_checkpoint(sam2_spec(server), tmp_path, progress=False, check=checked.append)
    assert path.name == "sam2.1_hiera_tiny.pt" and path.read_bytes() == PAYLOAD
    assert checked == [tmp_path / "sam2.1_hiera_tiny.pt.part"] and recorded_sha256(path) == DIGEST


def test_sam2_download_that_does_not_load_is_removed(server, tmp_path):
    def refuse(path):
        raise RuntimeError("Missing key(s) in state_dict")

    with pytest.raises(ChecksumError, match="does not load as a sam2.1_hiera_tiny model"):
        download_checkpoint(sam2_spec(server), tmp_path, progress=False, check=refuse)
    assert list(tmp_path.iterdir()) == []


def test_sam2_download_of_the_wrong_size_is_removed(server, tmp_path):
    with pytest.raises(ChecksumError, match="expected about"):
        download_checkpoint(sam2_spec(server, approx=10 * len(PAYLOAD)), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_sam2_file_is_refused_at_start(tiny_sam2_checkpoint, tmp_path):
    """The digest recorded at download protects the file from then on: a changed file is refused."""
    import os
    import shutil

    from sam_backend.config import Settings
    from sam_backend.segment.checkpoints import expected_sha256, sha256_file
    from sam_backend.segment.engines import EngineError
    from sam_backend.segment.engines.sam2 import Sam2Engine

    path = tmp_path / "sam2.1_hiera_tiny.pt"
    shutil.copy(tiny_sam2_checkpoint, path)
    stat = path.stat()
    (tmp_path / "sam2.1_hiera_tiny.pt.sha256").write_text(f"{sha256_file(path)} {stat.st_size} {stat.st_mtime_ns}\n")
    settings = Settings.from_env({"SAM_ENGINE": "sam2", "SAM_CHECKPOINT_DIR": str(tmp_path)})
    assert Sam2Engine.from_checkpoint(path, device="cpu", expected_sha256=expected_sha256(settings))
    with open(path, "r+b") as f:  # one byte changed, same size
        f.seek(stat.st_size - 5)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(EngineError, match="SHA-256 is"):
        Sam2Engine.from_checkpoint(path, device="cpu", expected_sha256=expected_sha256(settings))
    pinned = Settings.from_env({"SAM_ENGINE": "sam2", "SAM_CHECKPOINT_DIR": str(tmp_path),
                                "SAM_CHECKPOINT_SHA256": "a" * 64})
    assert expected_sha256(pinned) == "a" * 64  # an operator's pin wins over the recorded digest
