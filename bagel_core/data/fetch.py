"""Getting the example archive: download (resumable, retried, checksummed) and safe extraction.

Upstream users ``wget`` the zip and ``unzip`` it by hand. Here a source is a URL (``http(s)://`` or
``file://``), a local path, or ``builtin`` (the deterministic generator, zipped), and extraction
refuses anything that could write outside the target folder or exhaust the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from bagel_core.config.errors import DataError
from bagel_core.data.example_generator import ExampleConfig, write_example_dataset

OFFICIAL_EXAMPLE_URL = "https://lf3-static.bytednsdoc.com/obj/eden-cn/nuhojubrps/bagel_example.zip"
ARCHIVE_NAME = "bagel_example.zip"
DEFAULT_MAX_TOTAL_BYTES = 20 * 1024**3
DEFAULT_MAX_FILES = 200_000
_CHUNK = 1 << 20
#: Fixed timestamp for zip entries so the built-in archive is byte-for-byte reproducible.
_ZIP_EPOCH = (2025, 5, 26, 0, 0, 0)


class ChecksumError(DataError):
    """The fetched archive does not match the expected sha256."""


class UnsafeArchiveError(DataError):
    """The archive contains an entry we refuse to extract (traversal, link, too large, too many)."""


@dataclass
class FetchResult:
    path: Path
    source: str
    bytes: int
    sha256: str
    resumed_from: int = 0


@dataclass
class ExtractResult:
    target: Path
    files: int
    bytes: int
    skipped: bool
    top_level: list[str] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, expected: str | None, source: str) -> str:
    actual = sha256_file(path)
    if expected and actual.lower() != expected.lower():
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {source}: expected sha256 {expected.lower()}, got {actual}. "
            "The download was deleted; check the URL or the --sha256 value and retry."
        )
    return actual


# ---- built-in archive --------------------------------------------------------------------------
def write_deterministic_zip(src_dir: Path, dest_zip: Path, arc_root: str) -> None:
    """Zip ``src_dir`` as ``arc_root/...`` with sorted entries and fixed timestamps."""
    tmp = dest_zip.with_name(dest_zip.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(src_dir.rglob("*")):
            rel = path.relative_to(src_dir).as_posix()
            if path.is_dir():
                info = zipfile.ZipInfo(f"{arc_root}/{rel}/", _ZIP_EPOCH)
                info.external_attr = (stat.S_IFDIR | 0o755) << 16
                archive.writestr(info, b"")
            else:
                info = zipfile.ZipInfo(f"{arc_root}/{rel}", _ZIP_EPOCH)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    os.replace(tmp, dest_zip)


def build_builtin_archive(dest_zip: Path, config: ExampleConfig | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="bagel-example-", dir=dest_zip.parent) as tmp:
        root = write_example_dataset(tmp, config)
        write_deterministic_zip(root, dest_zip, root.name)


# ---- download ----------------------------------------------------------------------------------
def _download_http(url: str, dest: Path, retries: int, timeout: float, progress: bool) -> int:
    """Stream ``url`` into ``dest``; a ``.part`` file from an interrupted run is resumed with Range."""
    import requests
    from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    first_offset = part.stat().st_size if part.exists() else 0

    @retry(
        retry=retry_if_exception_type((requests.ConnectionError, requests.Timeout, requests.HTTPError)),
        stop=stop_after_attempt(retries),
        wait=wait_exponential(multiplier=0.5, max=30),
        reraise=True,
    )
    def attempt() -> None:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            if response.status_code == 416:  # nothing left to fetch: the .part is complete
                return
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                raise DataError(f"download of {url} failed: HTTP {response.status_code} (check the URL)")
            response.raise_for_status()
            resumed = response.status_code == 206
            mode = "ab" if resumed else "wb"
            total = response.headers.get("Content-Length")
            total_bytes = int(total) + (offset if resumed else 0) if total else None
            with (
                open(part, mode) as handle,
                tqdm(
                    total=total_bytes,
                    initial=offset if resumed else 0,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    disable=not progress,
                    file=sys.stderr,
                ) as bar,
            ):
                for chunk in response.iter_content(_CHUNK):
                    handle.write(chunk)
                    bar.update(len(chunk))
            if total_bytes is not None and part.stat().st_size != total_bytes:
                raise requests.ConnectionError(f"connection closed early: {part.stat().st_size} of {total_bytes} bytes")

    attempt()
    os.replace(part, dest)
    return first_offset


def _copy_local(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise DataError(f"source archive {src} does not exist")
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def fetch_archive(
    source: str,
    out_dir: str | Path,
    sha256: str | None = None,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    builtin_config=None,
) -> FetchResult:
    """Put the example archive at ``out_dir/bagel_example.zip`` and return what was fetched.

    ``source``: ``builtin``, ``http(s)://...``, ``file://...`` or a local path. A verified archive
    already in place (same sha256) is not fetched again.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / ARCHIVE_NAME
    if sha256 and dest.is_file() and sha256_file(dest) == sha256.lower():
        return FetchResult(dest, source, dest.stat().st_size, sha256.lower())
    resumed_from = 0
    parsed = urlparse(source)
    if source == "builtin":
        build_builtin_archive(dest, builtin_config)
    elif parsed.scheme in ("http", "https"):
        resumed_from = _download_http(source, dest, retries, timeout, progress)
    elif parsed.scheme == "file":
        _copy_local(Path(unquote(parsed.path)), dest)
    elif parsed.scheme == "" and source:
        _copy_local(Path(source).expanduser(), dest)
    else:
        raise DataError(f"unsupported source {source!r}: use 'builtin', an http(s):// or file:// URL, or a local path")
    digest = _verify(dest, sha256, source)
    return FetchResult(dest, source, dest.stat().st_size, digest, resumed_from)


# ---- safe extraction ---------------------------------------------------------------------------
def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is not a regular file or folder"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..' (path traversal)"
    if "\x00" in name:
        return "contains a NUL byte"
    return None


def check_archive(
    zip_path: Path, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_files: int = DEFAULT_MAX_FILES
) -> list[zipfile.ZipInfo]:
    """Validate every entry before anything is written; return the members to extract."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zip_path} is not a valid zip archive ({exc}); delete it and fetch again") from exc
    with archive:
        members = archive.infolist()
    for info in members:
        problem = _member_problem(info)
        if problem:
            raise UnsafeArchiveError(f"{zip_path}: refusing to extract: entry {info.filename!r} {problem}")
    files = [m for m in members if not m.is_dir()]
    if len(files) > max_files:
        raise UnsafeArchiveError(
            f"{zip_path}: {len(files)} files exceed the limit of {max_files}; raise max_files if this is expected"
        )
    declared = sum(m.file_size for m in files)
    if declared > max_total_bytes:
        raise UnsafeArchiveError(
            f"{zip_path}: {declared} bytes uncompressed exceed the limit of {max_total_bytes}; "
            "raise max_total_bytes if this is expected"
        )
    return members


def safe_extract(
    zip_path: str | Path,
    target_dir: str | Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
) -> ExtractResult:
    """Extract ``zip_path`` into ``target_dir`` atomically per top-level entry; idempotent.

    Entries are written into a private staging folder inside ``target_dir`` (same filesystem),
    with the byte limit enforced on actual, not declared, sizes; only a complete extraction is
    moved into place. A marker records the archive's sha256, so an unchanged archive is skipped.
    """
    zip_path, target = Path(zip_path), Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    digest = sha256_file(zip_path)
    marker = target / f".{zip_path.name}.extracted.json"
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("sha256") == digest and all((target / t).exists() for t in recorded.get("top_level", [])):
            return ExtractResult(target, recorded["files"], recorded["bytes"], True, recorded["top_level"])
    members = check_archive(zip_path, max_total_bytes, max_files)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
    written_files = written_bytes = 0
    try:
        staging_root = staging.resolve()
        with zipfile.ZipFile(zip_path) as archive:
            for info in members:
                dest = (staging / info.filename.replace("\\", "/")).resolve()
                if staging_root not in dest.parents and dest != staging_root:
                    raise UnsafeArchiveError(f"{zip_path}: entry {info.filename!r} resolves outside the target")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(dest, "wb") as out:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):
                        written_bytes += len(chunk)
                        if written_bytes > max_total_bytes:
                            raise UnsafeArchiveError(
                                f"{zip_path}: extracted data exceeds {max_total_bytes} bytes "
                                "(sizes in the archive directory are wrong); refusing"
                            )
                        out.write(chunk)
                written_files += 1
        top_level = sorted(p.name for p in staging.iterdir())
        for name in top_level:
            final = target / name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            os.replace(staging / name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(
        json.dumps({"sha256": digest, "files": written_files, "bytes": written_bytes, "top_level": top_level}, indent=2)
    )
    return ExtractResult(target, written_files, written_bytes, False, top_level)


def summarize_tree(root: str | Path) -> dict[str, dict[str, int]]:
    """File count and bytes per first-level folder (per task in the example layout)."""
    root = Path(root)
    summary: dict[str, dict[str, int]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).parts
            key = rel[0] if len(rel) > 1 else "."
            entry = summary.setdefault(key, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += path.stat().st_size
    return summary
