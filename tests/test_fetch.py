"""Fetching and extracting the example archive: checksums, resume, and refusal of unsafe archives."""

import hashlib
import http.server
import stat
import threading
import typing
import zipfile
from pathlib import Path

import pytest

from bagel_core.data.example_generator import ExampleConfig
from bagel_core.data.fetch import (
    ChecksumError,
    UnsafeArchiveError,
    fetch_archive,
    safe_extract,
    write_deterministic_zip,
)

TINY = ExampleConfig(
    t2i_files=2, t2i_rows_per_file=2, edit_files=1, edit_row_groups_per_file=1, edit_rows_per_row_group=2, vlm_lines=4
)


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def _zip(path: Path, entries: list[tuple[str, bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, data)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A target folder inside a parent whose other contents must never change."""
    parent = tmp_path / "parent"
    (parent / "target").mkdir(parents=True)
    (parent / "sibling.txt").write_text("keep")
    return parent


REG = stat.S_IFREG | 0o644


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../evil.txt", "path traversal"),
        ("bagel_example/../../evil.txt", "path traversal"),
        ("/tmp/evil-absolute.txt", "absolute path"),
    ],
)
def test_zip_slip_entries_are_refused(sandbox, tmp_path, name, problem):
    archive = _zip(tmp_path / "bad.zip", [("bagel_example/ok.txt", b"ok", REG), (name, b"evil", REG)])
    before = _tree(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=problem) as err:
        safe_extract(archive, sandbox / "target")
    assert name in str(err.value)
    assert _tree(tmp_path) == before  # nothing written anywhere, not even the good entry
    assert not Path("/tmp/evil-absolute.txt").exists()


def test_symlink_entries_are_refused(sandbox, tmp_path):
    archive = _zip(tmp_path / "link.zip", [("bagel_example/link", b"/etc/passwd", stat.S_IFLNK | 0o777)])
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(archive, sandbox / "target")
    assert list((sandbox / "target").iterdir()) == []


def test_size_and_count_limits(sandbox, tmp_path):
    archive = _zip(tmp_path / "big.zip", [(f"d/f{i}.bin", b"x" * 1000, REG) for i in range(5)])
    with pytest.raises(UnsafeArchiveError, match="5 files exceed the limit of 4"):
        safe_extract(archive, sandbox / "target", max_files=4)
    with pytest.raises(UnsafeArchiveError, match="5000 bytes uncompressed exceed the limit of 4999"):
        safe_extract(archive, sandbox / "target", max_total_bytes=4999)
    assert list((sandbox / "target").iterdir()) == []
    assert safe_extract(archive, sandbox / "target", max_files=5, max_total_bytes=5000).files == 5


def test_lying_size_header_is_caught_while_extracting(sandbox, tmp_path):
    archive = _zip(tmp_path / "lie.zip", [("d/big.bin", b"y" * 10_000, REG)])
    data = bytearray(archive.read_bytes())
    # Patch the declared uncompressed size (central directory and local header) down to 10 bytes.
    true_size = (10_000).to_bytes(4, "little")
    data = data.replace(true_size, (10).to_bytes(4, "little"))
    archive.write_bytes(bytes(data))
    with pytest.raises((UnsafeArchiveError, zipfile.BadZipFile)):
        safe_extract(archive, sandbox / "target", max_total_bytes=1000)
    assert not (sandbox / "target" / "d").exists()


def test_not_a_zip_is_a_clear_error(sandbox, tmp_path):
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"<html>404</html>")
    with pytest.raises(Exception, match="not a valid zip archive"):
        safe_extract(bogus, sandbox / "target")


def test_builtin_fetch_is_reproducible_and_extract_idempotent(tmp_path):
    first = fetch_archive("builtin", tmp_path / "a", builtin_config=TINY, progress=False)
    second = fetch_archive("builtin", tmp_path / "b", builtin_config=TINY, progress=False)
    assert first.sha256 == second.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    result = safe_extract(first.path, tmp_path / "a")
    assert not result.skipped and result.top_level == ["bagel_example"]
    marker_file = tmp_path / "a" / "bagel_example" / "t2i" / "chunk_0.parquet"
    mtime = marker_file.stat().st_mtime_ns
    again = safe_extract(first.path, tmp_path / "a")
    assert again.skipped and again.files == result.files
    assert marker_file.stat().st_mtime_ns == mtime
    # A changed archive replaces the old tree instead of mixing files.
    (tmp_path / "a" / "bagel_example" / "stale.txt").write_text("old")
    other = fetch_archive(
        "builtin", tmp_path / "c", builtin_config=ExampleConfig(**{**TINY.__dict__, "seed": 3}), progress=False
    )
    replaced = safe_extract(other.path, tmp_path / "a")
    assert not replaced.skipped and not (tmp_path / "a" / "bagel_example" / "stale.txt").exists()


def test_checksum_mismatch_fails_and_removes_file(tmp_path):
    source = _zip(tmp_path / "src.zip", [("bagel_example/a.txt", b"a", REG)])
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch_archive(source.as_uri(), tmp_path / "out", sha256="0" * 64, progress=False)
    assert not (tmp_path / "out" / "bagel_example.zip").exists()


def test_file_url_source(tmp_path):
    src_dir = tmp_path / "src" / "bagel_example"
    (src_dir / "t2i").mkdir(parents=True)
    (src_dir / "t2i" / "x.txt").write_text("hello")
    archive = tmp_path / "upload.zip"
    write_deterministic_zip(src_dir, archive, "bagel_example")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    result = fetch_archive(archive.as_uri(), tmp_path / "out", sha256=digest, progress=False)
    assert result.sha256 == digest
    safe_extract(result.path, tmp_path / "out")
    assert (tmp_path / "out" / "bagel_example" / "t2i" / "x.txt").read_text() == "hello"
    with pytest.raises(Exception, match="does not exist"):
        fetch_archive((tmp_path / "missing.zip").as_uri(), tmp_path / "out2", progress=False)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (like real CDNs), and counts requests."""

    requests_seen: typing.ClassVar[list[str]] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.requests_seen.append(self.headers.get("Range") or "full")
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        header = self.headers.get("Range")
        if header:
            start = int(header.split("=")[1].split("-")[0])
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(root), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _RangeHandler.requests_seen = []
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_download_resumes_partial_file(http_dir, tmp_path):
    root, base = http_dir
    payload = bytes(range(256)) * 4000
    (root / "bagel_example.zip").write_bytes(payload)
    out = tmp_path / "out"
    out.mkdir()
    (out / "bagel_example.zip.part").write_bytes(payload[:300_000])  # an interrupted earlier download
    digest = hashlib.sha256(payload).hexdigest()
    result = fetch_archive(f"{base}/bagel_example.zip", out, sha256=digest, progress=False)
    assert result.resumed_from == 300_000
    assert _RangeHandler.requests_seen == ["bytes=300000-"]
    assert result.path.read_bytes() == payload and not (out / "bagel_example.zip.part").exists()
    # Already there and verified: no second request.
    fetch_archive(f"{base}/bagel_example.zip", out, sha256=digest, progress=False)
    assert len(_RangeHandler.requests_seen) == 1


def test_http_404_is_a_clear_error(http_dir, tmp_path):
    _, base = http_dir
    with pytest.raises(Exception, match="HTTP 404"):
        fetch_archive(f"{base}/nope.zip", tmp_path / "out", progress=False, retries=1)


def test_unknown_scheme_is_rejected(tmp_path):
    with pytest.raises(Exception, match="unsupported source"):
        fetch_archive("ftp://example.org/x.zip", tmp_path, progress=False)
