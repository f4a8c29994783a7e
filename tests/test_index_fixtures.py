"""Small generated inputs for the indexer tests (imported by the other ``test_index_*`` modules),
plus unit tests of the image probe itself."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bagel_core.config.registry import Registry
from bagel_core.index import probe
from bagel_core.index.indexer import IndexOptions, IndexResult, index_registry


def image_bytes(width: int = 32, height: int = 24, fmt: str = "PNG", mode: str = "RGB", colour: int = 90) -> bytes:
    img = Image.new(mode, (width, height), colour if mode in ("L", "P") else (colour, 20, 200, 255)[: len(mode)])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` (a decompression bomb stand-in)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def caption(text: str = "a red square") -> str:
    return json.dumps({"short": text, "long": f"{text} on a white background"})


def write_t2i(path: Path, images: list[Any], captions: list[Any], row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": pa.array(images, pa.binary()), "captions": pa.array(captions, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def good_t2i(path: Path, n: int = 6, row_group_size: int = 4) -> Path:
    return write_t2i(
        path, [image_bytes(16 + i, 20) for i in range(n)], [caption(f"c{i}") for i in range(n)], row_group_size
    )


def write_edit(path: Path, image_lists: list[Any], instruction_lists: list[Any], row_group_size: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image_list", pa.list_(pa.binary())), ("instruction_list", pa.list_(pa.list_(pa.string())))])
    pq.write_table(
        pa.table({"image_list": image_lists, "instruction_list": instruction_lists}, schema=schema),
        path,
        row_group_size=row_group_size,
    )
    return path


def write_vlm(root: Path, lines: list[bytes | str | dict], images: dict[str, bytes] | None = None) -> tuple[Path, Path]:
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (images or {}).items():
        (img_dir / name).write_bytes(data)
    raw = b"".join(
        (line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode()) + b"\n"
        for line in lines
    )
    jsonl = root / "data.jsonl"
    jsonl.write_bytes(raw)
    return img_dir, jsonl


def vlm_line(images: list[str] | str | None, question: str = "<image>\nWhat is it?", answer: str = "A square.") -> dict:
    record: dict[str, Any] = {
        "id": "x",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if images is not None:
        record["image"] = images
    return record


def registry_for(**datasets: dict[str, Any]) -> Registry:
    """``registry_for(t2i={"data_dir": ...})``: group picked from the keyword's prefix."""
    groups = {"t2i": "t2i_pretrain", "edit": "unified_edit", "vlm": "vlm_sft"}
    data: dict[str, dict[str, Any]] = {}
    for name, entry in datasets.items():
        group = groups[name.split("_")[0]]
        data.setdefault(group, {})[name] = {k: str(v) for k, v in entry.items()}
    return Registry.from_dict(data)


def run_index(registry: Registry, out: Path, **opts: Any) -> tuple[IndexResult, pa.Table, pa.Table, pa.Table]:
    opts.setdefault("workers", 1)
    result = index_registry(registry, out, IndexOptions(**opts))
    index = pq.read_table(result.index_path)
    quarantine = pq.read_table(result.quarantine_path)
    files = pq.read_table(result.files_path)
    assert_accounting(index, files)
    return result, index, quarantine, files


def assert_accounting(index: pa.Table, files: pa.Table) -> None:
    """The invariant: per file, ok + quarantined == rows read == index rows == footer rows / JSONL lines."""
    per_file: dict[str, int] = {}
    for path in index.column("source_file").to_pylist():
        per_file[path] = per_file.get(path, 0) + 1
    for row in files.to_pylist():
        assert row["ok"] + row["quarantined"] == row["rows_read"], row
        assert per_file.get(row["source_file"], 0) == row["rows_read"], row
        if row["footer_rows"] >= 0:  # parquet: footer row count; JSONL: lines in the file
            assert row["rows_read"] == row["footer_rows"], row


def reasons(quarantine: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in quarantine.column("reason").to_pylist():
        out[r] = out.get(r, 0) + 1
    return out


# ---- probe unit tests ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt,mode",
    [("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("JPEG", "L"), ("WEBP", "RGB"), ("GIF", "P"), ("BMP", "RGB")],
)
def test_probe_reads_size_and_mode_from_header(fmt: str, mode: str) -> None:
    data = image_bytes(37, 21, fmt, mode)
    info = probe.probe_bytes(data)
    assert (info.width, info.height) == (37, 21)
    assert info.nbytes == len(data)
    assert info.format == fmt
    assert info.mode == Image.open(io.BytesIO(data)).mode


def test_probe_classifies_bad_images() -> None:
    cases = {
        probe.IMAGE_MISSING: None,
        probe.IMAGE_EMPTY: b"",
        probe.IMAGE_CORRUPT: b"definitely not an image" * 10,
        probe.IMAGE_TRUNCATED: image_bytes(64, 64, "PNG")[:-40],
        probe.IMAGE_TOO_LARGE: png_declaring(100_000, 100_000),
    }
    for reason, data in cases.items():
        with pytest.raises(probe.ProbeError) as err:
            probe.probe_bytes(data)
        assert err.value.reason == reason, (reason, err.value.message)


def test_probe_pixel_cap_is_configurable_and_jpeg_trailing_junk_is_fine() -> None:
    with pytest.raises(probe.ProbeError) as err:
        probe.probe_bytes(image_bytes(64, 64), max_pixels=1000)
    assert err.value.reason == probe.IMAGE_TOO_LARGE and "64x64" in err.value.message
    # bytes after EOI: decoded once to tell junk from truncation, then accepted
    assert probe.probe_bytes(image_bytes(40, 30, "JPEG") + b"trailing junk").width == 40
    truncated_jpeg = image_bytes(200, 200, "JPEG")[:-300]
    with pytest.raises(probe.ProbeError) as err:
        probe.probe_bytes(truncated_jpeg)
    assert err.value.reason == probe.IMAGE_TRUNCATED


def _variants() -> list[tuple[str, bytes]]:
    out = []
    for fmt, mode, kw in [
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "L", {}),
        ("PNG", "LA", {}),
        ("PNG", "P", {}),
        ("PNG", "1", {}),
        ("PNG", "I;16", {}),
        ("PNG", "RGB", {"transparency": (1, 2, 3)}),
        ("PNG", "L", {"transparency": 5}),
        ("JPEG", "RGB", {}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "RGB", {"exif": b"Exif\x00\x00" + b"\x00" * 5000}),
        ("JPEG", "RGB", {"subsampling": 0, "quality": 95}),
    ]:
        img = Image.new(mode, (53, 29))
        if mode == "P":
            img = Image.new("RGB", (53, 29), (200, 10, 10)).quantize(colors=4)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append((f"{fmt}-{mode}-{sorted(kw)}", buf.getvalue()))
    return out


@pytest.mark.parametrize("name,data", _variants(), ids=[n for n, _ in _variants()])
def test_fast_header_agrees_with_pillow(name: str, data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        expected = (im.width, im.height, im.mode)
    fast = probe.fast_header(data)
    if fast is not None:  # None means "let Pillow decide": allowed for unusual variants only
        assert fast[:3] == expected, name
    else:
        assert any(k in name for k in ("-1-", "I;16")), f"{name}: common variant missed the fast path"
    assert probe.probe_bytes(data)[:3] == expected


def test_zero_copy_cells_take_the_fast_path() -> None:
    """Arrow buffers export signed bytes; the indexer's views must compare like ``bytes``."""
    from bagel_core.index.units import _cells

    cells = _cells(pa.array([image_bytes(), image_bytes(fmt="JPEG")], pa.binary()))
    assert [probe.fast_header(c) for c in cells] == [(32, 24, "RGB", "PNG"), (32, 24, "RGB", "JPEG")]
    assert probe.probe_bytes(cells[1]).format == "JPEG"
