"""The vectorised fast path (``bagel_core.index.bulk``) gives exactly the per-row path's index.

Differential: every fixture is indexed twice, ``fast_path=True`` and ``fast_path=False`` (every row
through ``checks.py``), and the index tables must be equal row for row, reasons and messages
included. The fixtures cover the example data and each bad-input class, plus inputs built to sit
just outside the fast path's patterns (padding after EOI, junk after IEND, a bad IHDR CRC, JSON
with whitespace, escapes, duplicate keys, ...).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_index_fixtures import (
    _variants,
    caption,
    image_bytes,
    png_declaring,
    registry_for,
    write_edit,
    write_t2i,
)

from bagel_core.config.registry import Registry
from bagel_core.data.example_generator import ExampleConfig, write_example_dataset
from bagel_core.index import bulk, probe
from bagel_core.index.indexer import IndexOptions, index_registry


def _both(registry: Registry, tmp_path: Path, **opts: Any) -> tuple[pa.Table, pa.Table]:
    tables = []
    for fast in (True, False):
        result = index_registry(registry, tmp_path / f"out_{fast}", IndexOptions(workers=1, fast_path=fast, **opts))
        tables.append(pq.read_table(result.index_path))
    return tables[0], tables[1]


def assert_same_index(registry: Registry, tmp_path: Path, **opts: Any) -> pa.Table:
    fast, slow = _both(registry, tmp_path, **opts)
    assert fast.schema.equals(slow.schema)
    a, b = fast.to_pylist(), slow.to_pylist()
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for r in (ra, rb):  # Pillow names its BytesIO by address: the only run-to-run difference
            r["message"] = r["message"] and _ADDRESS.sub("at 0x?", r["message"])
        assert ra == rb
    return fast


_ADDRESS = re.compile(r"at 0x[0-9a-f]+")


def _jpeg_with(tail: bytes = b"", **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (41, 23), (10, 200, 30)).save(buf, format="JPEG", **save)
    return buf.getvalue() + tail


def _bad_ihdr_crc() -> bytes:
    data = bytearray(image_bytes(20, 20))
    data[29] ^= 0xFF
    return bytes(data)


def _png_16bit() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    raw = b"".join(b"\0" + b"\0" * 48 for _ in range(8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def odd_images() -> list[Any]:
    good = image_bytes()
    return [
        good,
        image_bytes(20, 10, "JPEG"),
        *(data for _, data in _variants()),
        b"\x89PNG garbage that is not an image",
        b"",
        png_declaring(100_000, 100_000),
        image_bytes(64, 64)[:-30],
        None,
        image_bytes(200, 200, "JPEG")[:-300],
        _jpeg_with(b"\x00\x00\r\n"),
        _jpeg_with(b"trailing junk"),
        good + b"junk after IEND",
        _bad_ihdr_crc(),
        _png_16bit(),
        png_declaring(0, 5),
        png_declaring(3, 0),
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xd9",
        b"\xff\xd8\xff\xda\x00\x02\xff\xd9",
        good[:33],
        good[:40],
        image_bytes(30, 30, "WEBP"),
        image_bytes(9, 9, "GIF", "P"),
        image_bytes(8, 8, "BMP"),
        _jpeg_with(progressive=True),
        _jpeg_with(exif=b"Exif\x00\x00" + b"\x00" * 60_000),
        b"\xff\xd8" + b"\xff" * 200 + b"\xd9",
    ]


def odd_captions() -> list[Any]:
    return [
        caption(),
        "a plain sentence",
        "",
        "{}",
        json.dumps(["a", "b"]),
        json.dumps({"short": 3}),
        None,
        json.dumps({"short": "  "}),
        "42",
        " " + caption(),
        caption() + "\n",
        '{"a": "x", "a": "longer"}',
        '{"a": "caf\\u00e9 \\ud83d\\ude00", "b": "tab\\there"}',
        '{"a": "\\u2003\\u00a0"}',
        '{"a": "x", "b": null}',
        '{"a": NaN}',
        '{"a": "x"',
        '{"a": "x"} {}',
        '{"a":"x","b":"y"}',
        '{"a": "\u00e9\u4e2d"}',
        '{"a": "x", "nested": {"b": "c"}}',
        '{"a": "\\u000b"}',
        '\ufeff{"a": "x"}',
        '{"a": "\x01"}',
    ]


def test_t2i_bad_images_and_captions_match_the_per_row_path(tmp_path: Path) -> None:
    images, captions = odd_images(), odd_captions()
    n = max(len(images), len(captions))
    d = tmp_path / "t2i"
    # every image with a good caption, every caption with a good image, then a few crossings
    write_t2i(d / "images.parquet", images, [caption()] * len(images), row_group_size=5)
    write_t2i(d / "captions.parquet", [image_bytes()] * len(captions), captions, row_group_size=7)
    write_t2i(
        d / "cross.parquet",
        [images[i % len(images)] for i in range(n)],
        [captions[(3 * i) % len(captions)] for i in range(n)],
        row_group_size=4,
    )
    index = assert_same_index(registry_for(t2i={"data_dir": d}), tmp_path)
    statuses = index.column("status").to_pylist()
    assert "ok" in statuses and "quarantined" in statuses


def test_pixel_cap_and_full_decode_match(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    write_t2i(
        d / "c.parquet", [image_bytes(10, 10), image_bytes(100, 100), image_bytes(70, 70, "JPEG")], [caption()] * 3
    )
    assert_same_index(registry_for(t2i={"data_dir": d}), tmp_path / "cap", max_pixels=5000)
    assert_same_index(registry_for(t2i={"data_dir": d}), tmp_path / "full", full_decode=True)


def test_invalid_utf8_and_large_binary_match(tmp_path: Path) -> None:
    d = tmp_path / "t2i"
    d.mkdir()
    raw = [caption("x").encode(), b'{"short": "caf\xe9"}', caption("y").encode()]
    binary = pa.array(raw, pa.binary())
    strings = pa.Array.from_buffers(pa.string(), len(raw), binary.buffers())
    pq.write_table(pa.table({"image": [image_bytes()] * 3, "captions": strings}), d / "a.parquet")
    pq.write_table(
        pa.table(
            {
                "image": pa.array([image_bytes(), b"junk", image_bytes(5, 5, "JPEG")], pa.large_binary()),
                "captions": pa.array([caption()] * 3, pa.large_string()),
            }
        ),
        d / "b.parquet",
    )
    assert_same_index(registry_for(t2i={"data_dir": d}), tmp_path)


def test_edit_rules_match_the_per_row_path(tmp_path: Path) -> None:
    d = tmp_path / "edit"
    img, jpg = image_bytes(), image_bytes(12, 8, "JPEG")
    write_edit(
        d / "chunk_0.parquet",
        [
            [img, img],
            [img, img, img],
            [img],
            [img, img],
            [img, b"junk"],
            [img, img],
            [img, jpg, img],
            None,
            [img, None],
            [img, png_declaring(100_000, 100_000)],
            [jpg, jpg],
            [img, img],
            [img, img],
            [],
            [img, img],
        ],
        [
            [["make it red"]],
            [["a"]],
            [],
            [["a"], ["b"]],
            [["a"]],
            [[]],
            [["a", "b"], ["c"]],
            [["a"]],
            [["a"]],
            [["a"]],
            [[" ", "\u3000"]],
            None,
            [["a", None]],
            [],
            [["caf\u00e9", "x"]],
        ],
        row_group_size=4,
    )
    index = assert_same_index(registry_for(edit={"data_dir": d}), tmp_path)
    assert index.column("status").to_pylist().count("ok") >= 3


def test_example_dataset_matches_and_takes_the_fast_path(tmp_path: Path) -> None:
    cfg = ExampleConfig(
        t2i_files=2,
        t2i_rows_per_file=12,
        t2i_rows_per_row_group=5,
        edit_files=2,
        edit_row_groups_per_file=2,
        edit_rows_per_row_group=3,
        vlm_lines=4,
    )
    root = write_example_dataset(tmp_path / "gen", cfg)
    reg = registry_for(t2i={"data_dir": root / "t2i"}, edit={"data_dir": root / "editing" / "seedxedit_multi"})
    index = assert_same_index(reg, tmp_path)
    assert index.num_rows == cfg.t2i_samples + cfg.edit_samples
    # every example row is a plain PNG/JPEG with good texts: the fast path must accept all of them
    for task, col in (("t2i", "image"), ("edit", "image_list")):
        entry = next(e for e in reg.entries if e.task == task)
        for path in entry.parquet_files():
            table = pq.read_table(path)
            arr = table.column(col).combine_chunks()
            arr = arr if task == "t2i" else arr.values
            assert bulk.probe_images(arr, probe.DEFAULT_MAX_PIXELS).ok.all(), path


@pytest.mark.parametrize("name,data", _variants(), ids=[n for n, _ in _variants()])
def test_bulk_probe_agrees_with_the_per_row_probe(name: str, data: bytes) -> None:
    cells = [data, data + b"x", data[:-1], data[: len(data) // 2], b"\x00" * 40, None]
    res = bulk.probe_images(pa.array(cells, pa.binary()), probe.DEFAULT_MAX_PIXELS)
    for i, cell in enumerate(cells):
        if not res.ok[i]:
            continue  # left to the per-row path
        info = probe.probe_bytes(cell)
        assert (int(res.width[i]), int(res.height[i]), bulk.MODES[res.mode[i]], int(res.nbytes[i])) == (
            info.width,
            info.height,
            info.mode,
            info.nbytes,
        ), (name, i)
    assert res.ok[0] == (probe.fast_header(data) is not None), name  # the common variants are taken in bulk


def test_bulk_probe_handles_sliced_arrays_and_many_rows() -> None:
    rng = np.random.default_rng(0)
    cells = [
        image_bytes(int(w), int(h), fmt)
        for w, h, fmt in zip(rng.integers(1, 60, 40), rng.integers(1, 60, 40), ["PNG", "JPEG"] * 20)
    ]
    arr = pa.array(cells, pa.binary()).slice(7, 25)
    res = bulk.probe_images(arr, probe.DEFAULT_MAX_PIXELS)
    assert res.ok.all()
    for i, cell in enumerate(cells[7:32]):
        info = probe.probe_bytes(cell)
        assert (res.width[i], res.height[i], bulk.MODES[res.mode[i]]) == (info.width, info.height, info.mode)


def test_threaded_units_give_the_same_index(tmp_path: Path) -> None:
    """Below ``min_rows_for_pool`` units run on threads in this process: same rows, same order."""
    d = tmp_path / "t2i"
    images = odd_images()
    for i in range(3):
        write_t2i(d / f"chunk_{i}.parquet", images, [caption(f"c{i}")] * len(images), row_group_size=3)
    reg = registry_for(t2i={"data_dir": d})
    threaded = index_registry(reg, tmp_path / "threads", IndexOptions(workers=2, unit_rows=4))
    serial = index_registry(reg, tmp_path / "serial", IndexOptions(workers=1, fast_path=False))
    a, b = pq.read_table(threaded.index_path).to_pylist(), pq.read_table(serial.index_path).to_pylist()
    for r in (*a, *b):
        r["message"] = r["message"] and _ADDRESS.sub("at 0x?", r["message"])
    assert a == b
